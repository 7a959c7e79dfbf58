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
codec did not send of a fragment's pseudo-gradient into that fragment's next sync. With ``outer_delay`` 1 (eager
outer steps, Kale et al. arXiv 2502.12996) a sync's exchange runs during the whole next window and its outer step
lands on the global weights at the next sync; meanwhile each group trains from where its own pseudo-gradient says
that outer step lands (the outer optimizer's look-ahead step), so training never waits for the link.

The schedule and the arithmetic are ``torchft.local_sgd.DiLoCo``'s (the same weights when nothing fails; a
test compares them for P in 1, 2, 4, tau in 0, 1, 2 and alpha in 0, 0.5). Ours differs in that:
- each sync is one flat exchange per fragment, not one all-reduce per parameter, and any codec works on
  Gloo as well as NCCL;
- a group that healed from a peer at this sync contributes nothing (its own weights are stale, so its
  ``global - local`` is noise) and the average is over the groups that did contribute;
- the average is weighted by the tokens each group trained on since the fragment's last sync
  (``tokens_per_step``; the header carries the work): groups of other batch sizes or H count for what they
  did, and equal groups get the plain mean bit for bit (the number of ranks must be the same in every group);
- healing also resets the model to the global weights, not only the backup;
- the global state (every fragment's weights and outer optimizer) is what durable checkpoints hold.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from torchx_diloco.cluster import group_world_size, rank0_decides, start_quorum
from torchx_diloco.codecs import Feedback, get_codec
from torchx_diloco.config import error_feedback_on, streaming_problem
from torchx_diloco.eager import EagerOuterSteps, InFlight
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
    local_tensor,
    param_ids,
    split_evenly,
)
from torchx_diloco.outer_loop import Schedule, Upcoming
from torchx_diloco.outer_state import Round
from torchx_diloco.pace import AutoH, Pacer

__all__ = ["DiLoCo", "STATE_KEY", "local_tensor", "split_evenly"]

logger = logging.getLogger(__name__)

STATE_KEY = "torchx_diloco"  # the name our global state is registered under with the manager


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


def _check_arguments(
    manager: Any,
    sync_every: int,
    fragments: int,
    overlap_steps: int,
    mix_alpha: float,
    codec: str,
    error_feedback: Optional[bool],
    topk_density: Optional[float],
    outer_delay: int,
    tokens_per_step: int,
) -> None:
    """DiLoCo's arguments, checked by the same code as the CLI's flags (:func:`config.streaming_problem`)."""
    if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
        raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
    problem = streaming_problem(
        sync_every, fragments, overlap_steps, mix_alpha, codec, True, error_feedback, topk_density, outer_delay
    )
    if problem is not None:
        raise ValueError(problem)
    if getattr(manager, "_use_async_quorum", False):
        raise ValueError("DiLoCo needs a Manager built with use_async_quorum=False")
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")


class DiLoCo(EagerOuterSteps):
    """Counts inner steps; syncs a fragment (the whole model by default) every ``sync_every / fragments``.

    Args:
        manager: a torchft ``Manager`` built with ``use_async_quorum=False`` (a group that heals must hold the
            global weights before it computes its pseudo-gradient).
        model: the module the inner optimizer trains.
        inner_optimizer: steps every batch (AdamW in the paper); only used here to check its parameters.
        outer_optimizer: steps on the averaged pseudo-gradient (SGD, lr 0.7, momentum 0.9, Nesterov); one for
            the whole model, or one per fragment when ``fragments`` is a list of modules.
        sync_every: H, inner steps between two syncs of the same parameters; ``AutoH(H)``: H for the fastest group,
            fewer for slower ones (:mod:`torchx_diloco.pace`; one fragment, no overlap, no outer delay).
        fragments: P, the number of fragments (contiguous, about equal size, in module order), or a list of
            modules that together hold every trainable parameter once.
        overlap_steps: tau, inner steps between sending a fragment's pseudo-gradient and applying the result.
        mix_alpha: after a fragment's outer step, its weights are ``lerp(global, local, mix_alpha)``.
        codec: what the pseudo-gradient crosses the link as: "fp32", "bf16", "int8", "int4", "int2" or "topk".
        outer_delay: 1 for eager outer steps (:mod:`torchx_diloco.eager`): a round is applied a window after it
            was sent; ``sync()`` applies the last one; checkpoints hold this rank's part of it (:meth:`rank_state`).
        topk_density: with ``codec="topk"``, the share of values sent (config.DEFAULT_TOPK_DENSITY by default).
        error_feedback: ``e <- (delta + e) - decode(encode(delta + e))`` per fragment and rank, added to its next
            pseudo-gradient (:mod:`torchx_diloco.codecs`); on ``backup_device``; zeros after a heal or an adopted
            step. None: on for ``config.ERROR_FEEDBACK_BY_DEFAULT`` (int2, topk).
        backup_device: where the global weights are kept between syncs (host memory by default).
        quorum_retry_s: how long a sync keeps retrying the quorum while the lighthouse is unreachable.
        tokens_per_step: the tokens one inner step of this group trains on (all ranks and micro-batches): each
            pseudo-gradient weighs in the average by its tokens; equal groups get the plain mean exactly.
        split_group: this replica group's ranks when they hold the same weights (DDP): each sends 1/G of the
            pseudo-gradient, so the link carries the model once per group. Not for FSDP (already disjoint shards).
        group, groups: this replica group's id and the run's number of groups (a header slot each): ``AutoH`` only.
        clock: what step times are measured with under ``AutoH`` (``time.perf_counter``; a test's own clock).
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
        outer_delay: int = 0,
        tokens_per_step: int = 1,
        group: int = 0,
        groups: int = 1,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        count = fragments if isinstance(fragments, int) else len(fragments)
        _check_arguments(
            manager,
            sync_every,
            count,
            overlap_steps,
            mix_alpha,
            codec,
            error_feedback,
            topk_density,
            outer_delay,
            tokens_per_step,
        )
        one_outer = isinstance(outer_optimizer, torch.optim.Optimizer)
        outers = [outer_optimizer] if isinstance(outer_optimizer, torch.optim.Optimizer) else list(outer_optimizer)
        named = _trainable_parameters(model, inner_optimizer, outers)
        self._fragments = build_fragments(named, fragments, outers[0] if one_outer else outers, backup_device)
        self.manager, self.model, self.outer_optimizers = manager, model, outers
        self._one_outer = one_outer  # its state is saved as one dict, a list of them otherwise
        auto = isinstance(sync_every, AutoH)
        self._pacer = Pacer(int(sync_every), group, groups, len(Slot), clock) if auto else None
        clock_every = int(sync_every) if auto else 0
        self.schedule = Schedule(int(sync_every), len(self._fragments), overlap_steps, outer_delay, clock_every)
        self.mix_alpha, self.tokens_per_step, self.quorum_retry_s = mix_alpha, tokens_per_step, quorum_retry_s
        self._params = [p for _, p in named]
        # this rank's layout: groups of a run must cut and shard the model alike (checked at every exchange)
        wire = get_codec(codec, topk_density)
        self._signature = layout_signature(
            len(self._fragments), wire.key, sum(f.numel for f in self._fragments), group_world_size()
        )
        background = overlap_steps > 0 or outer_delay > 0
        self._exchange = Exchange(manager, wire, split_group, background, pace_slots=groups if auto else 0)
        for f in self._fragments:
            if error_feedback_on(codec, error_feedback):
                f.zero_residual(self._exchange.share_numel(f.numel))
            if outer_delay:
                f.start_eagerly()
        self._in_flight: Optional[InFlight] = None
        self._sent: Optional[Round] = None  # eager outer steps: this rank's part of the round in flight
        self._resend: Optional[Round] = None  # ... and of the one a checkpoint held, sent again at the next sync
        self._healed = False
        self._step_at_sync = manager.current_step()
        self._window_sync_s = 0.0  # the time step() held training up in this window so far
        self.local_step = 0  # inner steps since the last outer step
        self.last_sync: Dict[str, Any] = {}  # the last outer step: fragment, sent_bytes, sync_s
        manager.register_state_dict_fn(STATE_KEY, self._load_healed_state, self.state_dict)

    # --- the loop --------------------------------------------------------------------------------------
    def upcoming(self) -> Upcoming:
        """What the next :meth:`step` does (a quorum, an outer step), for the caller to get ready for it."""
        # eagerly, the round in flight is an outer step already taken on the run's clock
        in_flight = self.schedule.outer_delay and (self._in_flight is not None or self._resend is not None)
        return self.schedule.upcoming(self.manager.current_step() + int(in_flight), self.local_step)

    def step(self) -> bool:
        """Call after each inner optimizer step. Returns True when this call committed an outer step."""
        if self._pacer is None:
            return self._step()
        with self._pacer.timer.outside_inner_step():
            return self._step()

    def _step(self) -> bool:
        started = time.perf_counter()
        self.local_step += 1
        for f in self._fragments:
            f.inner_steps += 1
        if self.schedule.outer_delay:
            return self._eager_step(started) if self.local_step == self.schedule.steps_per_sync else False
        if self.local_step == self.schedule.send_at:
            self._send()
        if self.local_step < self.schedule.steps_per_sync:
            self._window_sync_s += time.perf_counter() - started  # (a send ahead of its apply: overlapped)
            return False
        return self._apply_timed(started)  # from this call's start: its send too, when it sent

    def sync(self) -> bool:
        """Sync now, blocking: apply the fragment in flight if one was sent, else send the next one and apply
        it. False if the round was dropped. (``step`` does both on time; with eager outer steps, the round in
        flight at the end of a run is applied by this call.)"""
        started = time.perf_counter()
        healed = self._send_again() if self._resend is not None else False
        if self._in_flight is None:
            self._send(quorum=not healed)
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
            self._quorum()
        fragment = self._fragments[self.schedule.fragment_at(self.manager.current_step())]
        if self._healed:  # our local weights predate the global ones we just received (and our residuals are zeros)
            sending = Round(torch.zeros(fragment.numel, dtype=torch.float32, device=self._params[0].device), 0.0)
            self._healed = False
        else:
            sending = Round(fragment.pseudo_gradient(), float(fragment.inner_steps * self.tokens_per_step))
        fragment.inner_steps = 0
        if self.schedule.outer_delay:  # kept: the exchange sums the payload in place
            self._sent = Round(sending.payload.to(fragment.backup[0].device, copy=True), sending.work)
        self._start_round(fragment, sending)
        if self._sent is not None:
            fragment.eager_restart(self._sent.payload if sending.work > 0 else None)

    def _quorum(self) -> None:
        """Ask for the quorum of this sync (a group behind heals in it: :meth:`_load_healed_state`)."""
        self._step_at_sync = self.manager.current_step()
        start_quorum(self.manager, self.quorum_retry_s)

    def _start_round(self, fragment: Fragment, sending: Round) -> None:
        header = new_header(Slot.SYNCING, self._signature, self._params[0].device, self._exchange.pace_slots)
        header[Slot.CONTRIBUTORS], header[Slot.WORK] = float(sending.work > 0), sending.work
        if self._pacer is not None:
            self._pacer.stamp(header)
        residual = fragment.residual
        feedback = None if residual is None else Feedback(residual, torch.zeros_like(residual))
        sent = self._exchange.start(sending.payload, header, feedback)
        self._in_flight = InFlight(fragment, sending.payload, header, sent, feedback)

    def _drop_in_flight(self) -> None:
        if self._in_flight is not None:
            self._in_flight.sent_bytes.result()
            self._in_flight = None
        self._sent = self._resend = None

    def _apply(self) -> bool:
        """Wait for the fragment in flight; commit; take its outer step from its global weights; mix."""
        assert self._in_flight is not None, "a sync is applied only after it was sent"
        flight, self._in_flight = self._in_flight, None
        sent_bytes = flight.sent_bytes.result()
        check_layout(flight.header)
        if self._pacer is not None and self.manager.errored() is None:  # (a failed round's header says nothing)
            h = rank0_decides(self._pacer.next_sync_every(flight.header), flight.header.device)
            self.schedule = replace(self.schedule, sync_every=h)
        fragment = flight.fragment
        self.last_sync = {"fragment": fragment.index, "sent_bytes": sent_bytes}
        self._sent = None
        local = [t.detach().clone() for t in fragment.locals()] if self.mix_alpha > 0 else None
        if not self.schedule.outer_delay:  # (eagerly, the local weights train on from where they started)
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
        if contributors > 0 and self.schedule.outer_delay:
            fragment.outer_step_aside(flight.payload.div_(contributors))
        elif contributors > 0:
            fragment.outer_step(flight.payload.div_(contributors))  # in place: no second copy
        if local is not None:
            with torch.no_grad():
                for t, mine in zip(fragment.locals(), local, strict=True):
                    t.lerp_(mine, self.mix_alpha)
        return True

    def agree_initial_weights(self, attempts: int = 3) -> None:
        """Before the first inner step of a fresh run: every group takes the quorum's first group's initial weights
        (participating rank 0), whatever the model's factory did. One quorum and one exchange (rank 0 sends its
        weights, the others zeros) whose header says it is an agreement: a group meeting others mid-sync heals to
        their step and contributes nothing; at step 0 that round is dropped for all (its header has both kinds)
        and everyone restores its global weights, which the step-0 heal made the quorum primary's."""
        for attempt in range(1, attempts + 1):
            self._quorum()
            if self.manager.current_step() > self._step_at_sync:  # healed: the others are syncing a later step
                self._send(quorum=False)
                if not self.schedule.outer_delay:  # (eagerly, the next window's end applies it, as theirs)
                    self._apply()
                return
            sender = self.manager.participating_rank() == 0
            flat, header = exchange_initial_weights(self._exchange, self._locals(), self._signature, sender)
            if self.manager.errored() is None and float(header[Slot.SYNCING]) == 0:
                self._start_from(flat)  # everyone in the quorum is starting: take rank 0's weights
                return
            if float(header[Slot.SYNCING]) > 0:  # met a sync at step 0: everyone drops it (see above)
                self.manager.should_commit()
                self.reset_to_global(newer=False)
                return
            logger.warning("no agreement on the initial weights (attempt %d of %d)", attempt, attempts)
        raise RuntimeError(f"the groups did not agree on initial weights in {attempts} attempts")
