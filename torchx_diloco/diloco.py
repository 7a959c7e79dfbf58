"""DiLoCo's outer loop on a torchft ``Manager``: the part of training that crosses replica groups.

Every ``sync_every`` inner steps each group sends its pseudo-gradient ``global - local``; the average over the
groups that contributed becomes the gradient of an outer optimizer step (SGD with Nesterov momentum in the
paper) taken from the last global weights. Between syncs the groups never talk, which is the point.

Streaming DiLoCo (arXiv 2501.18512) is the same loop on ``fragments`` P: the parameters, in module order, cut
into P contiguous parts of about equal size; one part syncs every H/P inner steps, each part every H, so the
link carries 1/P of the model at a time. A fragment's sync can be sent ``overlap_steps`` (tau) inner steps
before it is applied, its communication running while they train; after its outer step the fragment keeps
``mix_alpha`` of its local weights. ``codec`` picks what the pseudo-gradient is sent as (fp32, bf16, int8,
int4, int2, topk: see :mod:`torchx_diloco.codecs`); with ``error_feedback`` each rank carries what its lossy
codec did not send of a fragment's pseudo-gradient into that fragment's next sync.

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

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from torchx_diloco.cluster import start_quorum
from torchx_diloco.codecs import Feedback, get_codec
from torchx_diloco.config import error_feedback_on, streaming_problem
from torchx_diloco.exchange import (
    Exchange,
    Slot,
    check_layout,
    exchange_initial_weights,
    layout_signature,
    new_header,
)
from torchx_diloco.fragment import (
    Fragment,
    OuterOptimizers,
    build_fragments,
    load_residuals,
    local_tensor,
    param_ids,
    residuals_of,
    split_evenly,
)
from torchx_diloco.outer_loop import Schedule, Upcoming

__all__ = ["DiLoCo", "STATE_KEY", "local_tensor", "split_evenly"]

logger = logging.getLogger(__name__)

STATE_KEY = "torchx_diloco"  # the name our global state is registered under with the manager


def _check_global_state(
    tensors: List[Tuple[str, nn.Parameter, torch.Tensor]], weights: Mapping[str, Any], outer: Any, outers: Optional[int]
) -> None:
    """A global state fits ``tensors`` (names, shapes) and the outer optimizers: one (``outers`` None: one state, not
    a list) or a list of ``outers``."""
    missing = {name for name, _, _ in tensors} ^ set(weights)
    if missing:
        raise ValueError(f"global weights do not match the model: differing names {sorted(missing)[:5]}")
    if isinstance(outer, list) != (outers is not None) or (outers is not None and len(outer) != outers):
        raise ValueError("the saved outer optimizer state does not match: pass the same fragments and optimizers")
    for name, _, backup in tensors:
        if weights[name].shape != backup.shape:
            raise ValueError(
                f"global weight {name} has shape {tuple(weights[name].shape)}, the model has {tuple(backup.shape)}"
            )


def _trainable_parameters(
    model: nn.Module, inner: torch.optim.Optimizer, outers: List[torch.optim.Optimizer]
) -> List[Tuple[str, nn.Parameter]]:
    """The model's trainable parameters, by name, once the optimizers are checked against them."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    if param_ids(inner) != {id(p) for _, p in named}:
        raise ValueError("inner_optimizer must optimise exactly the model's trainable parameters")
    if any(inner is o for o in outers):
        raise ValueError("inner_optimizer and outer_optimizer must be different optimizers")
    return named


@dataclass
class _InFlight:
    """A fragment's sync between the moment it was sent and the moment it is applied."""

    fragment: Fragment
    payload: torch.Tensor
    header: torch.Tensor
    sent_bytes: "Future[int]"
    feedback: Optional[Feedback]  # the fragment's residual, and the one it leaves if the round commits


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
        codec: what the pseudo-gradient crosses the link as: "fp32", "bf16", "int8", "int4", "int2" or "topk".
        topk_density: with ``codec="topk"``, the share of values sent (config.DEFAULT_TOPK_DENSITY by default).
        error_feedback: each rank adds to a fragment's pseudo-gradient what its (lossy) codec did not send of the
            fragment's last committed one: ``e <- (delta + e) - decode(encode(delta + e))``, see
            :mod:`torchx_diloco.codecs` for what "sent" is with each codec. The residuals live on
            ``backup_device``; a group that heals or adopts a newer step starts from zeros. None (the default):
            on for the codecs of ``config.ERROR_FEEDBACK_BY_DEFAULT`` (int2, topk), off for the others.
        backup_device: where the global weights are kept between syncs (host memory by default).
        quorum_retry_s: how long a sync keeps retrying the quorum while the lighthouse is unreachable.
        split_group: a ``torch.distributed`` process group of this replica group's ranks when they hold the
            same weights (DDP): each sends 1/G of the pseudo-gradient to other groups, so the slow link carries
            the model once per group, not G times. Not for FSDP, whose ranks already hold disjoint shards.
    """

    adopts_from_storage = True  # a group left behind sits out one round after adopting a newer step

    def __init__(
        self,
        manager: Any,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: OuterOptimizers,
        sync_every: int,
        fragments: Union[int, Sequence[nn.Module]] = 1,
        overlap_steps: int = 0,
        mix_alpha: float = 0.0,
        codec: str = "fp32",
        backup_device: torch.device | str = "cpu",
        quorum_retry_s: float = 60.0,
        split_group: Optional[Any] = None,
        error_feedback: Optional[bool] = None,
        topk_density: Optional[float] = None,
    ) -> None:
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
        count = fragments if isinstance(fragments, int) else len(fragments)
        problem = streaming_problem(
            sync_every, count, overlap_steps, mix_alpha, codec, True, error_feedback, topk_density
        )
        if problem is not None:
            raise ValueError(problem)
        if getattr(manager, "_use_async_quorum", False):
            raise ValueError("DiLoCo needs a Manager built with use_async_quorum=False")
        one_outer = isinstance(outer_optimizer, torch.optim.Optimizer)
        outers = [outer_optimizer] if isinstance(outer_optimizer, torch.optim.Optimizer) else list(outer_optimizer)
        named = _trainable_parameters(model, inner_optimizer, outers)
        self._fragments = build_fragments(named, fragments, outers[0] if one_outer else outers, backup_device)

        self.manager = manager
        self.model = model
        self.outer_optimizers = outers
        self._one_outer = one_outer  # its state is saved as one dict, a list of them otherwise
        self.schedule = Schedule(sync_every, len(self._fragments), overlap_steps)
        self.mix_alpha = mix_alpha
        self.quorum_retry_s = quorum_retry_s
        self._params = [p for _, p in named]
        # this rank's layout: groups of a run must cut and shard the model alike (checked at every exchange)
        wire = get_codec(codec, topk_density)
        self._signature = layout_signature(len(self._fragments), wire.key, sum(f.numel for f in self._fragments))
        self._exchange = Exchange(manager, wire, split_group, background=overlap_steps > 0)
        if error_feedback_on(codec, error_feedback):
            for f in self._fragments:
                f.zero_residual(self._exchange.share_numel(f.numel))
        self._in_flight: Optional[_InFlight] = None
        self._healed = False
        self._step_at_sync = manager.current_step()
        self._window_sync_s = 0.0  # the time step() held training up in this window so far
        self.local_step = 0  # inner steps since the last outer step
        self.last_sync: Dict[str, Any] = {}  # the last outer step: fragment, sent_bytes, sync_s
        manager.register_state_dict_fn(STATE_KEY, self._load_healed_state, self.state_dict)

    def _locals(self) -> List[torch.Tensor]:
        return [t for f in self._fragments for t in f.locals()]

    @property
    def local_differs_from_global(self) -> bool:
        """Whether the model can hold weights other than the global ones right after an outer step (then a
        checkpoint needs the local weights too, for a bit-identical resume)."""
        return len(self._fragments) > 1 or self.mix_alpha > 0

    # --- the global state: what a healing peer receives and what durable checkpoints hold ---------------
    def global_tensors(self) -> List[Tuple[str, nn.Parameter, torch.Tensor]]:
        """(name, parameter, its global weights: this rank's shard under FSDP), in the model's parameter order."""
        return [t for f in self._fragments for t in zip(f.names, f.params, f.backup, strict=True)]

    def global_weights(self) -> List[torch.Tensor]:
        """Every parameter's global weights, in the model's parameter order."""
        return [b for f in self._fragments for b in f.backup]

    def state_dict(self) -> Dict[str, Any]:
        """Every fragment's global weights and outer optimizer state (the same in every group after a commit)."""
        outer = [o.state_dict() for o in self.outer_optimizers]
        weights = {name: backup for name, _, backup in self.global_tensors()}
        return {"global_weights": weights, "outer_optimizer": outer[0] if self._one_outer else outer}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Adopt ``state`` as the global state and reset the model to those weights."""
        weights, outer = state["global_weights"], state["outer_optimizer"]
        _check_global_state(
            self.global_tensors(), weights, outer, None if self._one_outer else len(self.outer_optimizers)
        )
        self._drop_in_flight()
        with torch.no_grad():
            for name, _, backup in self.global_tensors():
                backup.copy_(weights[name])
        for o, s in zip(self.outer_optimizers, [outer] if self._one_outer else outer, strict=True):
            o.load_state_dict(s)
        self.reset_to_global(newer=False)

    def adopt_newer_global_state(self, state: Dict[str, Any]) -> None:
        """Take global weights newer than our local progress (from a peer or from storage).

        The model is reset to them, and this group contributes nothing to the next sync: its inner steps
        started from weights the others have moved past.
        """
        self.load_state_dict(state)
        self._healed = True
        self._zero_residuals()

    def reset_to_global(self, newer: bool) -> None:
        """After the global weights were loaded in place: the model takes them (``newer``: as
        :meth:`adopt_newer_global_state`, this group's inner steps then count for nothing)."""
        self._drop_in_flight()
        for f in self._fragments:
            f.restore_backup()
        self._healed = self._healed or newer
        if newer:
            self._zero_residuals()

    # --- error feedback: this rank's own state, in its group's checkpoint part, never sent to a healing peer --
    def residuals(self) -> Dict[str, torch.Tensor]:
        """This rank's error-feedback residuals by fragment (``fragment_0``, ...): empty without error feedback."""
        return residuals_of(self._fragments)

    def load_residuals(self, saved: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`residuals` from a checkpoint (see :func:`~torchx_diloco.fragment.load_residuals`)."""
        load_residuals(self._fragments, saved)

    def _zero_residuals(self) -> None:
        for f in self._fragments:
            f.zero_residual()

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

    # --- the loop --------------------------------------------------------------------------------------
    def upcoming(self) -> Upcoming:
        """What the next :meth:`step` does (a quorum, an outer step), for the caller to get ready for it."""
        return self.schedule.upcoming(self.manager.current_step(), self.local_step)

    def step(self) -> bool:
        """Call after each inner optimizer step. Returns True when this call committed an outer step."""
        started = time.perf_counter()
        self.local_step += 1
        if self.local_step == self.schedule.send_at:
            self._send()
            self._window_sync_s += time.perf_counter() - started
        if self.local_step < self.schedule.steps_per_sync:
            return False
        return self._apply_timed(started)

    def sync(self) -> bool:
        """Sync now, blocking: apply the fragment in flight if one was sent, else send the next one and apply
        it. False if the round was dropped. (``step`` does both on time.)"""
        started = time.perf_counter()
        if self._in_flight is None:
            self._send()
        return self._apply_timed(started)

    def close(self) -> None:
        """Wait for a sync in flight and stop the thread that sends them."""
        self._drop_in_flight()
        self._exchange.close()

    def _apply_timed(self, started: float) -> bool:
        self.local_step = 0
        committed = self._apply()
        self.last_sync["sync_s"] = self._window_sync_s + time.perf_counter() - started
        self._window_sync_s = 0.0
        return committed

    def _send(self, quorum: bool = True) -> None:
        """The quorum (a group behind heals here), the fragment's pseudo-gradient, and its exchange started."""
        if quorum:
            self._step_at_sync = self.manager.current_step()
            start_quorum(self.manager, self.quorum_retry_s)
        fragment = self._fragments[self.schedule.fragment_at(self.manager.current_step())]
        header = new_header(Slot.SYNCING, self._signature, self._params[0].device)
        if self._healed:  # our local weights predate the global ones we just received (and our residuals are zeros)
            payload = torch.zeros(fragment.numel, dtype=torch.float32, device=header.device)
            self._healed = False
        else:
            payload = fragment.pseudo_gradient()
            header[Slot.CONTRIBUTORS] = 1.0
        residual = fragment.residual
        feedback = None if residual is None else Feedback(residual, torch.zeros_like(residual))
        sent = self._exchange.start(payload, header, feedback)
        self._in_flight = _InFlight(fragment, payload, header, sent, feedback)

    def _drop_in_flight(self) -> None:
        if self._in_flight is not None:
            self._in_flight.sent_bytes.result()
            self._in_flight = None

    def _apply(self) -> bool:
        """Wait for the fragment in flight; commit; take its outer step from its global weights; mix."""
        assert self._in_flight is not None, "a sync is applied only after it was sent"
        flight, self._in_flight = self._in_flight, None
        sent_bytes = flight.sent_bytes.result()
        check_layout(flight.header)
        fragment = flight.fragment
        self.last_sync = {"fragment": fragment.index, "sent_bytes": sent_bytes}
        local = [t.detach().clone() for t in fragment.locals()] if self.mix_alpha > 0 else None
        fragment.restore_backup()
        if not self.manager.should_commit():
            logger.warning(
                "outer step %d not committed: discarding fragment %d's last inner steps",
                self.manager.current_step() + 1,
                fragment.index,
            )
            return False  # the residual stays the one before this round: none of it was applied
        if flight.feedback is not None:
            fragment.residual = flight.feedback.left
        contributors = float(flight.header[Slot.CONTRIBUTORS])
        if contributors > 0:
            fragment.outer_step(flight.payload.div_(contributors))  # in place: no second copy
        if local is not None:
            with torch.no_grad():
                for t, mine in zip(fragment.locals(), local, strict=True):
                    t.lerp_(mine, self.mix_alpha)
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
            start_quorum(self.manager, self.quorum_retry_s)
            if self.manager.current_step() > self._step_at_sync:  # healed: the others are syncing a later step
                self._send(quorum=False)
                self._apply()
                return
            locals_ = self._locals()
            sender = self.manager.participating_rank() == 0
            flat, header = exchange_initial_weights(self._exchange, locals_, self._signature, sender)
            if self.manager.errored() is None and float(header[Slot.SYNCING]) == 0:
                with torch.no_grad():  # everyone in the quorum is starting: take rank 0's weights
                    for t, part in zip(locals_, flat.split([t.numel() for t in locals_]), strict=True):
                        t.copy_(part.view_as(t))
                for f in self._fragments:
                    f.save_backup()
                return
            if float(header[Slot.SYNCING]) > 0:  # met a sync at step 0: everyone drops it (see above)
                self.manager.should_commit()
                self.reset_to_global(newer=False)
                return
            logger.warning("no agreement on the initial weights (attempt %d of %d)", attempt, attempts)
        raise RuntimeError(f"the groups did not agree on initial weights in {attempts} attempts")
