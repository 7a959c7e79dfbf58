"""DiLoCo's outer loop on a torchft ``Manager``: the part of training that crosses replica groups.

Every ``sync_every`` inner steps each group sends its pseudo-gradient ``global - local``; the average over the
groups that contributed becomes the gradient of an outer optimizer step (SGD with Nesterov momentum in the
paper) taken from the last global weights. Between syncs the groups never talk, which is the point.

Streaming DiLoCo (arXiv 2501.18512) is the same loop on ``fragments`` P: the parameters, in module order, cut
into P contiguous parts of about equal size; one part syncs every H/P inner steps, each part every H, so the
link carries 1/P of the model at a time. A fragment's sync can be sent ``overlap_steps`` (tau) inner steps
before it is applied, its communication running while they train; after its outer step the fragment keeps
``mix_alpha`` of its local weights. ``codec`` picks what the pseudo-gradient is sent as (fp32, bf16, int8,
int4: see :mod:`torchx_diloco.codecs`).

The schedule and the arithmetic are ``torchft.local_sgd.DiLoCo``'s (the same weights when nothing fails; a
test compares them for P in 1, 2, 4, tau in 0, 1, 2 and alpha in 0, 0.5). Ours differs in that:
- each sync is one flat exchange per fragment, not one all-reduce per parameter, and any codec works on
  Gloo as well as NCCL;
- a group that healed from a peer at this sync contributes nothing (its own weights are stale, so its
  ``global - local`` is noise) and the average is over the groups that did contribute;
- healing also resets the model to the global weights, not only the backup;
- the global state (every fragment's weights and outer optimizer) is what durable checkpoints hold.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.distributed import ReduceOp

from torchx_diloco.codecs import allreduce_sum, get_codec
from torchx_diloco.config import streaming_problem
from torchx_diloco.errors import UserError

logger = logging.getLogger(__name__)

STATE_KEY = "torchx_diloco"  # the name our global state is registered under with the manager

# The header every exchange starts with, summed over the quorum (fp64: exact): who is in this round and why,
# and a signature of the layout (fragments, codec, model size) with its square: sum(s)^2 == n sum(s^2) only
# when the n members' signatures are equal, so groups started with different flags are told apart.
CONTRIBUTORS, SYNCING, AGREEING, SIGNATURE, SIGNATURE_SQUARED = range(5)


def _param_ids(optimizer: torch.optim.Optimizer) -> set:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local shard of an FSDP2 (DTensor) parameter, else the parameter."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


@contextlib.contextmanager
def _grads_set_aside(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Parameters without gradients for a moment: torch's optimizer state-dict helpers initialise an optimizer
    that has no state yet (so a checkpoint has somewhere to load into) only when no parameter has a gradient."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g


def split_evenly(sizes: Sequence[int], parts: int) -> List[range]:
    """``parts`` contiguous ranges over tensors of ``sizes`` whose totals are as equal as whole tensors allow."""
    if parts > len(sizes):
        raise ValueError(f"fragments={parts} exceeds the model's {len(sizes)} trainable parameter tensors")
    cumulative = list(itertools.accumulate(sizes))
    total, cuts = cumulative[-1], [0]
    for k in range(1, parts):
        lo, hi = cuts[-1] + 1, len(sizes) - (parts - k)  # leave at least one tensor to each later part
        cuts.append(min(range(lo, hi + 1), key=lambda c: abs(cumulative[c - 1] - k * total / parts)))
    cuts.append(len(sizes))
    return [range(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


class Fragment:
    """Parameters that sync together: their global weights (the backup, as of this fragment's last commit)
    and the outer optimizer that steps them."""

    def __init__(
        self,
        index: int,
        names: List[str],
        params: List[nn.Parameter],
        outer_optimizer: torch.optim.Optimizer,
        backup_device: torch.device | str,
    ) -> None:
        self.index, self.names, self.params, self.outer_optimizer = index, names, params, outer_optimizer
        self.numel = sum(t.numel() for t in self.locals())  # this rank's share (a shard under FSDP)
        pin = torch.device(backup_device).type == "cpu" and torch.cuda.is_available()
        self.backup = [torch.empty(t.shape, dtype=t.dtype, device=backup_device, pin_memory=pin) for t in self.locals()]

    def locals(self) -> List[torch.Tensor]:
        return [local_tensor(p) for p in self.params]

    @torch.no_grad()
    def save_backup(self) -> None:
        for t, backup in zip(self.locals(), self.backup, strict=True):
            backup.copy_(t.detach())  # blocking: a checkpoint writer may read the backup next

    @torch.no_grad()
    def restore_backup(self) -> None:
        for t, backup in zip(self.locals(), self.backup, strict=True):
            t.copy_(backup, non_blocking=False)

    @torch.no_grad()
    def pseudo_gradient(self) -> torch.Tensor:
        """``global - local`` of every parameter (this rank's shards), flat, in fp32."""
        device = self.params[0].device
        flat = torch.empty(self.numel, dtype=torch.float32, device=device)
        offset = 0
        for t, backup in zip(self.locals(), self.backup, strict=True):
            n = t.numel()
            torch.sub(backup.to(device, non_blocking=True).view(-1), t.reshape(-1), out=flat[offset : offset + n])
            offset += n
        return flat

    @torch.no_grad()
    def outer_step(self, average: torch.Tensor) -> None:
        from torch.distributed.tensor import DTensor

        offset = 0
        for p, t in zip(self.params, self.locals(), strict=True):
            n = t.numel()
            grad = average[offset : offset + n].view_as(t).to(t.dtype)
            if isinstance(p, DTensor):  # FSDP2: the shard's gradient, as the DTensor the optimizer expects
                grad = DTensor.from_local(grad, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            p.grad = grad
            offset += n
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self.save_backup()


@dataclass
class _InFlight:
    """A fragment's sync between the moment it was sent and the moment it is applied."""

    fragment: Fragment
    payload: torch.Tensor
    header: torch.Tensor
    sent_bytes: "Future[int]"


class DiLoCo:
    """Counts inner steps; syncs a fragment (the whole model by default) every ``sync_every / fragments``.

    Args:
        manager: a torchft ``Manager`` built with ``use_async_quorum=False`` (a group that heals must hold the
            global weights before it computes its pseudo-gradient).
        model: the module the inner optimizer trains.
        inner_optimizer: steps every batch (AdamW in the paper); only used here to check its parameters.
        outer_optimizer: steps on the averaged pseudo-gradient (SGD, lr 0.7, momentum 0.9, Nesterov); one for
            the whole model, or one per fragment when ``fragments`` is a list of modules.
        sync_every: H, inner steps between two syncs of the same parameters.
        fragments: P, the number of fragments (contiguous, about equal size, in module order), or a list of
            modules that together hold every trainable parameter once.
        overlap_steps: tau, inner steps between sending a fragment's pseudo-gradient and applying the result.
        mix_alpha: after a fragment's outer step, its weights are ``lerp(global, local, mix_alpha)``.
        codec: what the pseudo-gradient crosses the link as: "fp32", "bf16", "int8" or "int4".
        backup_device: where the global weights are kept between syncs (host memory by default).
        quorum_retry_s: how long a sync keeps retrying the quorum while the lighthouse is unreachable.
        split_group: a ``torch.distributed`` process group of this replica group's ranks when they hold the
            same weights (DDP): each sends 1/G of the pseudo-gradient to other groups, so the slow link carries
            the model once per group, not G times. Not for FSDP, whose ranks already hold disjoint shards.
    """

    def __init__(
        self,
        manager: Any,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]],
        sync_every: int,
        fragments: Union[int, Sequence[nn.Module]] = 1,
        overlap_steps: int = 0,
        mix_alpha: float = 0.0,
        codec: str = "fp32",
        backup_device: torch.device | str = "cpu",
        quorum_retry_s: float = 60.0,
        split_group: Optional[Any] = None,
    ) -> None:
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
        count = fragments if isinstance(fragments, int) else len(fragments)
        problem = streaming_problem(sync_every, count, overlap_steps, mix_alpha, codec)
        if problem is not None:
            raise ValueError(problem.replace("--", "").replace("-", "_"))
        if getattr(manager, "_use_async_quorum", False):
            raise ValueError("DiLoCo needs a Manager built with use_async_quorum=False")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        if _param_ids(inner_optimizer) != {id(p) for _, p in named}:
            raise ValueError("inner_optimizer must optimise exactly the model's trainable parameters")
        separate = not isinstance(outer_optimizer, torch.optim.Optimizer)  # one outer optimizer per fragment
        outers: List[torch.optim.Optimizer] = (
            list(outer_optimizer) if not isinstance(outer_optimizer, torch.optim.Optimizer) else [outer_optimizer]
        )
        if any(inner_optimizer is o for o in outers):
            raise ValueError("inner_optimizer and outer_optimizer must be different optimizers")

        parts = self._parts(named, fragments)
        if not separate:
            if _param_ids(outers[0]) != {id(p) for _, p in named}:
                raise ValueError("outer_optimizer must optimise exactly the model's trainable parameters")
            outers = outers * len(parts)
        elif len(outers) != len(parts):
            raise ValueError(f"{len(outers)} outer optimizers for {len(parts)} fragments: pass one per fragment")
        self._fragments = [
            Fragment(i, [named[j][0] for j in part], [named[j][1] for j in part], outer, backup_device)
            for i, (part, outer) in enumerate(zip(parts, outers, strict=True))
        ]
        for f in self._fragments:
            if separate and _param_ids(f.outer_optimizer) != {id(p) for p in f.params}:
                raise ValueError(f"outer optimizer {f.index} must optimise exactly fragment {f.index}'s parameters")
            f.save_backup()

        self.manager = manager
        self.model = model
        self.outer_optimizers = outers
        self._separate_outer = separate
        self.outer_optimizer = outers[0]
        self.sync_every = sync_every
        self.steps_per_sync = sync_every // len(parts)  # inner steps between two fragment syncs
        self.overlap_steps = overlap_steps
        self.mix_alpha = mix_alpha
        self.codec = get_codec(codec)
        self.quorum_retry_s = quorum_retry_s
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        # this rank's layout: groups of a run must cut and shard the model alike (checked at every exchange)
        layout = f"{len(parts)}/{codec}/{sum(f.numel for f in self._fragments)}"
        self._signature = float(zlib.crc32(layout.encode()) % (1 << 20) + 1)
        self._split_group = split_group if split_group is not None and split_group.size() > 1 else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="diloco-sync") if overlap_steps > 0 else None
        self._in_flight: Optional[_InFlight] = None
        self._healed = False
        self._step_at_sync = manager.current_step()
        self.local_step = 0  # inner steps since the last outer step
        self.last_sync: Dict[str, int] = {}  # the fragment and the bytes this group sent in the last outer step
        manager.register_state_dict_fn(STATE_KEY, self._load_healed_state, self.state_dict)

    @staticmethod
    def _parts(named: List[tuple], fragments: Union[int, Sequence[nn.Module]]) -> List[range] | List[List[int]]:
        if isinstance(fragments, int):
            return split_evenly([p.numel() for _, p in named], fragments)
        index = {id(p): i for i, (_, p) in enumerate(named)}
        parts = [[index.get(id(p), -1) for p in m.parameters() if p.requires_grad] for m in fragments]
        flat = sorted(i for part in parts for i in part)
        if flat != list(range(len(named))) or any(not part for part in parts):
            raise ValueError("fragments must hold every trainable parameter of the model exactly once")
        return parts

    def _locals(self) -> List[torch.Tensor]:
        return [t for f in self._fragments for t in f.locals()]

    @property
    def fragments(self) -> List[Fragment]:
        return list(self._fragments)

    @property
    def local_differs_from_global(self) -> bool:
        """Whether the model can hold weights other than the global ones right after an outer step (then a
        checkpoint needs the local weights too, for a bit-identical resume)."""
        return len(self._fragments) > 1 or self.mix_alpha > 0

    # --- the global state: what a healing peer receives and what durable checkpoints hold ---------------
    def state_dict(self) -> Dict[str, Any]:
        """Every fragment's global weights and outer optimizer state (the same in every group after a commit)."""
        weights = {n: b for f in self._fragments for n, b in zip(f.names, f.backup, strict=True)}
        outer: Any = (
            [o.state_dict() for o in self.outer_optimizers]
            if self._separate_outer
            else self.outer_optimizer.state_dict()
        )
        return {"global_weights": weights, "outer_optimizer": outer}

    def distributed_state_dict(self) -> Dict[str, Any]:
        """The global state for torch.distributed.checkpoint: each rank's global weights as DTensors where the
        model is sharded (plain tensors otherwise) and the outer optimizers keyed by parameter name, so a
        checkpoint written by one layout (ranks per group, ddp or fsdp) loads into another. Loading in place into
        this very dict, then :meth:`load_distributed_state_dict`, restores it."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        from torch.distributed.tensor import DTensor

        weights = {}
        for f in self._fragments:
            for name, p, backup in zip(f.names, f.params, f.backup, strict=True):
                weights[name] = (
                    DTensor.from_local(backup, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                    if isinstance(p, DTensor)
                    else backup
                )
        with _grads_set_aside(self._params):  # so that an optimizer without state yet gets (zero) state to load
            outer = get_optimizer_state_dict(self.model, self._unique_outers())
        return {"global_weights": weights, "outer_optimizer": outer}

    def load_distributed_state_dict(self, state: Dict[str, Any], newer: bool) -> None:
        """Adopt a :meth:`distributed_state_dict` that DCP loaded in place: reset the model to it (``newer``: as
        :meth:`adopt_newer_global_state`, this group's inner steps then count for nothing)."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        self._drop_in_flight()
        with torch.no_grad():
            for f in self._fragments:
                for name, backup in zip(f.names, f.backup, strict=True):
                    loaded = local_tensor(state["global_weights"][name])
                    if loaded.data_ptr() != backup.data_ptr():
                        backup.copy_(loaded)
        with _grads_set_aside(self._params):
            set_optimizer_state_dict(self.model, self._unique_outers(), state["outer_optimizer"])
        for f in self._fragments:
            f.restore_backup()
        if newer:
            self._healed = True

    def _unique_outers(self) -> List[torch.optim.Optimizer]:
        return list({id(o): o for o in self.outer_optimizers}.values())

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Adopt ``state`` as the global state and reset the model to those weights."""
        weights = state["global_weights"]
        missing = set(self._names) ^ set(weights)
        if missing:
            raise ValueError(f"global weights do not match the model: differing names {sorted(missing)[:5]}")
        outer = state["outer_optimizer"]
        separate = self._separate_outer
        if separate != isinstance(outer, list) or (separate and len(outer) != len(self.outer_optimizers)):
            raise ValueError("the saved outer optimizer state does not match: pass the same fragments and optimizers")
        self._drop_in_flight()
        with torch.no_grad():
            for f in self._fragments:
                for name, backup in zip(f.names, f.backup, strict=True):
                    if weights[name].shape != backup.shape:
                        raise ValueError(
                            f"global weight {name} has shape {tuple(weights[name].shape)}, "
                            f"the model has {tuple(backup.shape)}"
                        )
                    backup.copy_(weights[name])
        if separate:
            for o, s in zip(self.outer_optimizers, outer, strict=True):
                o.load_state_dict(s)
        else:
            self.outer_optimizer.load_state_dict(outer)
        for f in self._fragments:
            f.restore_backup()

    def _load_healed_state(self, state: Dict[str, Any]) -> None:
        """A peer's global state, received during the quorum of a sync (torchft sets the step first)."""
        if self.manager.current_step() == self._step_at_sync:
            # Same step (torchft re-syncs everyone at step 0): our inner steps started from these very
            # weights, so they still count; adopt the peer's copy of the global state and keep them.
            local = [t.detach().clone() for t in self._locals()]
            self.load_state_dict(state)
            with torch.no_grad():
                for t, mine in zip(self._locals(), local, strict=True):
                    t.copy_(mine)
            return
        self.adopt_newer_global_state(state)
        logger.info("healed from a peer: now at outer step %d", self.manager.current_step())

    def adopt_newer_global_state(self, state: Dict[str, Any]) -> None:
        """Take global weights newer than our local progress (from a peer or from storage).

        The model is reset to them, and this group contributes nothing to the next sync: its inner steps
        started from weights the others have moved past.
        """
        self.load_state_dict(state)
        self._healed = True

    def global_weights(self) -> List[torch.Tensor]:
        """Every parameter's global weights, in the model's parameter order."""
        return [b for f in self._fragments for b in f.backup]

    # --- the loop --------------------------------------------------------------------------------------
    @property
    def quorum_due(self) -> bool:
        """True when the next :meth:`step` starts a sync (a quorum; a group behind heals there)."""
        return self.local_step + 1 == self.steps_per_sync - self.overlap_steps

    @property
    def sync_due(self) -> bool:
        """True when the next :meth:`step` changes the global state (a quorum or an outer step): the moment to
        finish anything that reads it."""
        return self.quorum_due or self.local_step + 1 >= self.steps_per_sync

    def step(self) -> bool:
        """Call after each inner optimizer step. Returns True when this call committed an outer step."""
        self.local_step += 1
        if self.local_step == self.steps_per_sync - self.overlap_steps:
            self._send()
        if self.local_step < self.steps_per_sync:
            return False
        self.local_step = 0
        return self._apply()

    def sync(self) -> bool:
        """Sync the next fragment now, blocking; False if the round was dropped. (``step`` calls it on time.)"""
        self._send()
        self.local_step = 0
        return self._apply()

    def close(self) -> None:
        """Wait for a sync in flight and stop the thread that sends them."""
        self._drop_in_flight()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _send(self, start_quorum: bool = True) -> None:
        """The quorum (a group behind heals here), the fragment's pseudo-gradient, and its exchange started."""
        if start_quorum:
            self._step_at_sync = self.manager.current_step()
            self._start_quorum()
        fragment = self._fragments[self.manager.current_step() % len(self._fragments)]
        header = self._header(SYNCING)
        if self._healed:  # our local weights predate the global ones we just received
            payload = torch.zeros(fragment.numel, dtype=torch.float32, device=header.device)
            self._healed = False
        else:
            payload = fragment.pseudo_gradient()
            header[CONTRIBUTORS] = 1.0
        self._in_flight = _InFlight(fragment, payload, header, self._submit(self._exchange, payload, header))

    def _header(self, kind: int) -> torch.Tensor:
        header = torch.zeros(5, dtype=torch.float64, device=self._params[0].device)
        header[kind] = 1.0
        header[SIGNATURE], header[SIGNATURE_SQUARED] = self._signature, self._signature**2
        return header

    @staticmethod
    def _layouts_differ(header: torch.Tensor) -> bool:
        members = float(header[SYNCING] + header[AGREEING])
        return float(header[SIGNATURE]) ** 2 != members * float(header[SIGNATURE_SQUARED])

    def _check_layout(self, header: torch.Tensor) -> None:
        if self._layouts_differ(header):
            raise UserError(
                "the groups of this run sync different layouts (--fragments, --codec or the model differ): "
                "start every group with the same flags"
            )

    def _submit(self, fn: Any, *args: Any) -> "Future[int]":
        if self._executor is not None:
            return self._executor.submit(fn, *args)
        done: Future[int] = Future()
        done.set_result(fn(*args))
        return done

    def _exchange(self, payload: torch.Tensor, header: torch.Tensor) -> int:
        """The header, then the payload as the codec sends it; returns the bytes this rank sent to other groups.

        With ``split_group`` (the group's ranks hold the same weights), rank r sends only the r-th slice of the
        payload across groups, and the group's ranks then all-gather the summed slices over their own links.
        """
        if self._split_group is None:
            return self._exchange_across_groups(header, payload, payload)
        import torch.distributed as dist

        ranks, rank = self._split_group.size(), self._split_group.rank()
        padded = torch.cat([payload, payload.new_zeros(-payload.numel() % ranks)])
        share = padded.numel() // ranks
        sent = self._exchange_across_groups(header, padded, padded[rank * share : (rank + 1) * share])
        # always, whatever the round turned out to be, so no rank of the group waits for another in vain
        dist.all_gather_into_tensor(padded, padded[rank * share : (rank + 1) * share].clone(), group=self._split_group)
        payload.copy_(padded[: payload.numel()])
        return sent

    def _exchange_across_groups(self, header: torch.Tensor, payload: torch.Tensor, share: torch.Tensor) -> int:
        self.manager.allreduce(header, reduce_op=ReduceOp.SUM).wait()
        if self._layouts_differ(header):
            self.manager.report_error(RuntimeError("the groups' sync layouts differ"))
            return 0
        if float(header[AGREEING]) > 0 and float(header[SYNCING]) > 0:
            # a starting group's initial weights met this sync (agree_initial_weights): no average
            self.manager.report_error(RuntimeError("a starting group's initial weights reached this sync"))
            return 0
        if float(header[AGREEING]) > 0:  # everyone is agreeing on initial weights: those travel exactly
            return allreduce_sum(self.manager, payload, get_codec("fp32"))
        return allreduce_sum(self.manager, share, self.codec)

    def _drop_in_flight(self) -> None:
        if self._in_flight is not None:
            self._in_flight.sent_bytes.result()
            self._in_flight = None

    def _apply(self) -> bool:
        """Wait for the fragment in flight; commit; take its outer step from its global weights; mix."""
        assert self._in_flight is not None, "a sync is applied only after it was sent"
        flight, self._in_flight = self._in_flight, None
        sent_bytes = flight.sent_bytes.result()
        self._check_layout(flight.header)
        fragment = flight.fragment
        local = [t.detach().clone() for t in fragment.locals()] if self.mix_alpha > 0 else None
        fragment.restore_backup()
        if not self.manager.should_commit():
            logger.warning(
                "outer step %d not committed: discarding fragment %d's last inner steps",
                self.manager.current_step() + 1,
                fragment.index,
            )
            return False
        contributors = float(flight.header[CONTRIBUTORS])
        if contributors > 0:
            fragment.outer_step(flight.payload.div_(contributors))  # in place: no second copy
        if local is not None:
            with torch.no_grad():
                for t, mine in zip(fragment.locals(), local, strict=True):
                    t.lerp_(mine, self.mix_alpha)
        self.last_sync = {"fragment": fragment.index, "sent_bytes": sent_bytes}
        return True

    def agree_initial_weights(self, attempts: int = 3) -> None:
        """Before the first inner step of a fresh run: every group takes the initial weights of the quorum's
        first group (participating rank 0), whatever the model's factory did (unseeded, seeded per group).

        One quorum and one exchange in which rank 0 sends its weights and the others zeros. Its header says
        it is an agreement, so a group that meets others in the middle of a sync joins that sync instead: it
        heals to their step (at a later step) and contributes nothing; at step 0, the round is dropped for
        all (its header has both kinds), and everyone restores its global weights, which the step-0 heal just
        made the quorum's primary's.
        """
        for attempt in range(1, attempts + 1):
            self._step_at_sync = self.manager.current_step()
            self._start_quorum()
            if self.manager.current_step() > self._step_at_sync:  # healed: the others are syncing a later step
                self._send(start_quorum=False)
                self._apply()
                return
            header = self._header(AGREEING)
            flat = torch.zeros(sum(f.numel for f in self._fragments), dtype=torch.float32, device=header.device)
            if self.manager.participating_rank() == 0:
                torch.cat([t.detach().reshape(-1).float() for t in self._locals()], out=flat)
            self._exchange(flat, header)
            self._check_layout(header)
            if self.manager.errored() is None and float(header[SYNCING]) == 0:
                with torch.no_grad():  # everyone in the quorum is starting: take rank 0's weights
                    offset = 0
                    for t in self._locals():
                        t.copy_(flat[offset : offset + t.numel()].view_as(t))
                        offset += t.numel()
                for f in self._fragments:
                    f.save_backup()
                return
            if float(header[SYNCING]) > 0:  # met a sync at step 0: everyone drops it (see above)
                self.manager.should_commit()
                for f in self._fragments:
                    f.restore_backup()
                return
            logger.warning("no agreement on the initial weights (attempt %d of %d)", attempt, attempts)
        raise RuntimeError(f"the groups did not agree on initial weights in {attempts} attempts")

    # --- pieces ------------------------------------------------------------------------------------------
    def _start_quorum(self) -> None:
        """torchft's quorum, retried while the lighthouse is away (restarted, or its node rebooting)."""
        deadline = time.monotonic() + self.quorum_retry_s
        while True:
            try:
                self.manager.start_quorum()
                return
            except Exception as e:  # noqa: BLE001 - gRPC surfaces as several types; retried, then re-raised
                # torchft keeps the failed quorum and re-raises it on every later call: forget it to retry
                self.manager._quorum_future = None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no quorum for {self.quorum_retry_s:g}s (is the lighthouse up?): {e}") from e
                logger.warning(
                    "quorum failed (%s: %s); retrying until the lighthouse answers",
                    type(e).__name__,
                    str(e).splitlines()[0][:200],
                )
                time.sleep(1.0)
