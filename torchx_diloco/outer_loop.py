"""The outer loop's schedule and the interface the trainer talks to, shared by ours and torchft's.

:class:`Schedule` is torchft's streaming schedule (a fragment's quorum and send at H/P - tau, its outer step at
H/P, fragment ``step % P``); :class:`Upcoming` is what the next ``step()`` will do, so the training loop gets
ready for a sync without re-deriving the schedule; :class:`OuterLoop` is what :class:`~torchx_diloco.DiLoCo` and
:class:`~torchx_diloco.torchft_diloco.TorchftDiLoCo` (``--impl torchft``) both provide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Protocol, Tuple

import torch


@dataclass(frozen=True)
class Upcoming:
    """What the outer loop's next ``step()`` does."""

    inner_step: int  # that inner step's place on the run's clock: outer step x H/P + steps into the window
    starts_quorum: bool  # a quorum, where a group behind heals
    changes_global: bool  # a quorum or an outer step: what reads the global state must be done with it first
    ends_window: bool  # the outer step is applied (committed, or dropped)


@dataclass(frozen=True)
class Schedule:
    """When a fragment syncs: every ``sync_every / fragments`` inner steps one fragment, in turn, its sync sent
    ``overlap_steps`` inner steps before it is applied; with ``outer_delay`` 1, sent at the end of a window and
    applied at the end of the next one (the last round of a run is waited for: :meth:`OuterLoop.sync`)."""

    sync_every: int
    fragments: int = 1
    overlap_steps: int = 0
    outer_delay: int = 0
    clock_every: int = 0  # the H the run's clock counts in, where this group's own changes (auto:H); 0: sync_every

    @property
    def steps_per_sync(self) -> int:
        """Inner steps between two outer steps (fragment syncs): H/P."""
        return self.sync_every // self.fragments

    @property
    def send_at(self) -> int:
        """The step into the window (1-based) at which the quorum is asked for and the sync sent."""
        return self.steps_per_sync - self.overlap_steps

    def fragment_at(self, outer_step: int) -> int:
        """The fragment that the sync ending at outer step ``outer_step + 1`` carries."""
        return outer_step % self.fragments

    def upcoming(self, outer_step: int, local_step: int) -> Upcoming:
        """What step ``local_step + 1`` of the window after outer step ``outer_step`` does."""
        step = local_step + 1
        quorum, ends = step == self.send_at, step >= self.steps_per_sync
        clock = (self.clock_every or self.sync_every) // self.fragments  # (a group of fewer steps moves faster on it)
        return Upcoming(outer_step * clock + local_step * clock // self.steps_per_sync, quorum, quorum or ends, ends)


class OuterLoop(Protocol):
    """An outer loop as the trainer and the checkpointer use it.

    ``step()`` is called after every inner optimizer step and returns True when it committed an outer step;
    ``last_sync`` then holds what that sync did (``fragment``, ``sent_bytes``, ``sync_s``: the seconds the
    outer loop held training up for it; no ``fragment`` when the window's end applied nothing: the first one
    with ``outer_delay``). ``sync()`` applies the round in flight now, blocking. The global state is every
    fragment's global weights and outer optimizer: ``state_dict`` for one file, ``global_tensors`` and
    ``outer_optimizers`` for sharded formats. What else is each rank's own (error feedback's residuals, eager
    outer steps' starting points and the round in flight) is ``rank_state``: in the group's part.
    """

    schedule: Schedule
    last_sync: Dict[str, Any]
    outer_optimizers: List[torch.optim.Optimizer]  # each once

    @property
    def local_differs_from_global(self) -> bool:
        """Whether the model may hold other weights than the global ones right after a commit."""

    @property
    def adopts_from_storage(self) -> bool:
        """Whether a group left behind may adopt a newer step from storage before a quorum."""

    def upcoming(self) -> Upcoming: ...

    def step(self) -> bool: ...

    def sync(self) -> bool: ...

    def agree_initial_weights(self) -> None: ...

    def global_weights(self) -> List[torch.Tensor]: ...

    def global_tensors(self) -> List[Tuple[str, torch.nn.Parameter, torch.Tensor]]: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...

    def adopt_newer_global_state(self, state: Dict[str, Any]) -> None: ...

    def reset_to_global(self, newer: bool) -> None: ...

    def rank_state(self, template: bool = False) -> Dict[str, torch.Tensor]:
        """This rank's own state (``template``: also zeros of what a checkpoint may hold, to load into)."""

    def load_rank_state(self, saved: Mapping[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...
