"""What DiLoCo keeps between syncs: the global state and each rank's own.

The global state is every fragment's global weights and outer optimizer: the same in every group after a commit,
what a healing peer receives and what durable checkpoints hold. Each rank's own state (error feedback's residuals,
eager outer steps' starting points and its part of the round in flight) is in its group's checkpoint part and
never sent to a peer. :class:`OuterState` holds both for :class:`~torchx_diloco.diloco.DiLoCo`, which adds the loop.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from torchx_diloco.codecs import Feedback
from torchx_diloco.fragment import Fragment, load_residuals, residuals_of
from torchx_diloco.outer_loop import Schedule

logger = logging.getLogger("torchx_diloco.diloco")  # (its messages are the outer loop's)


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


@dataclass
class Round:
    """What this rank put into a round (eager outer steps): a checkpoint holds it, so a resume sends it again."""

    payload: torch.Tensor  # its pseudo-gradient, before error feedback (on the backup device)
    work: float  # the tokens it trained on for it (its weight in the average); 0 when it had just healed: zeros


@dataclass
class InFlight:
    """A fragment's sync between the moment it was sent and the moment it is applied."""

    fragment: Fragment
    payload: torch.Tensor
    header: torch.Tensor
    sent_bytes: "Future[int]"
    feedback: Optional[Feedback]  # the fragment's residual, and the one it leaves if the round commits


class OuterState:
    """The global state and each rank's own, over the fragments; the loop (a subclass) sets the attributes."""

    manager: Any
    schedule: Schedule
    mix_alpha: float
    outer_optimizers: List[torch.optim.Optimizer]
    _fragments: List[Fragment]
    _one_outer: bool  # one outer optimizer: its state is saved as one dict, a list of them otherwise
    _params: List[nn.Parameter]
    _sent: Optional[Round]  # eager outer steps: this rank's part of the round in flight
    _resend: Optional[Round]  # ... and of the one a checkpoint held, sent again at the next sync
    _healed: bool  # this group's local weights predate the global ones: it sends zeros next
    _step_at_sync: int  # the manager's step when the current quorum was asked for

    def _drop_in_flight(self) -> None:
        """The loop waits for a round in flight and forgets it (the global state is being replaced)."""
        raise NotImplementedError

    def _locals(self) -> List[torch.Tensor]:
        return [t for f in self._fragments for t in f.locals()]

    def _start_from(self, flat: torch.Tensor) -> None:
        """A fresh run starts from these weights (every local tensor's, flat in module order): global and local."""
        locals_ = self._locals()
        with torch.no_grad():
            for t, part in zip(locals_, flat.split([t.numel() for t in locals_]), strict=True):
                t.copy_(part.view_as(t))
        for f in self._fragments:
            f.save_backup()
            f.restore_backup()  # (and an eager start at them)

    @property
    def local_differs_from_global(self) -> bool:
        """Whether the model can hold weights other than the global ones right after an outer step (then a
        checkpoint needs the local weights too, for a bit-identical resume)."""
        return len(self._fragments) > 1 or self.mix_alpha > 0 or self.schedule.outer_delay > 0

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

    # --- this rank's own state, in its group's checkpoint part, never sent to a healing peer ---------------
    def rank_state(self, template: bool = False) -> Dict[str, torch.Tensor]:
        """Error feedback's residuals by fragment (``fragment_0``, ...) and, with eager outer steps, each fragment's
        starting point (``start_0``, ...) and this rank's part of the round in flight (``round``,
        ``round_work``). ``template``: zeros of the round a checkpoint of this step may hold, to load into."""
        state = residuals_of(self._fragments)
        if self.schedule.clock_every:  # auto:H: this group's H for the window after this step, as decided
            state["sync_every"] = torch.tensor([self.schedule.sync_every], dtype=torch.int64)
        if not self.schedule.outer_delay:
            return state
        state.update({f"start_{f.index}": f.start for f in self._fragments if f.start is not None})
        sent = self._sent
        if sent is None and template:
            numel = self._fragments[self.schedule.fragment_at(self.manager.current_step())].numel
            sent = Round(torch.zeros(numel), 0.0)
        if sent is not None:
            state.update(round=sent.payload, round_work=torch.tensor([sent.work], dtype=torch.float64))
        return state

    def load_rank_state(self, saved: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`rank_state` from a checkpoint (residuals: :func:`~torchx_diloco.fragment.load_residuals`;
        without a saved start, a fragment's inner phase starts at its global weights)."""
        load_residuals(self._fragments, saved)
        if self.schedule.clock_every and "sync_every" in saved:
            self.schedule = replace(self.schedule, sync_every=int(saved["sync_every"][0]))
        for f in self._fragments:
            start = saved.get(f"start_{f.index}")
            if f.start is not None and start is not None and start.shape == f.start.shape:
                f.start.copy_(start)
        if self.schedule.outer_delay and "round" in saved and "round_work" in saved:
            payload = saved["round"].to(self._params[0].device)
            self._resend = Round(payload.clone(), float(saved["round_work"][0]))

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
