"""Eager outer steps (``outer_delay=1``, Kale et al. arXiv 2502.12996): the end of a window, and the resend of a
round a checkpoint held. The rest of the loop is :class:`~torchx_diloco.diloco.DiLoCo`'s, shared with blocking
syncs: this is only what differs when a round is applied one window after it was sent.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from torchx_diloco.fragment import Fragment
from torchx_diloco.outer_state import InFlight, OuterState, Round


class EagerOuterSteps(OuterState):
    """The window's end with eager outer steps; the loop (a subclass) sends, applies and takes quorums."""

    _in_flight: Optional[InFlight]
    _window_sync_s: float  # the time step() held training up in this window so far
    local_step: int
    last_sync: Dict[str, Any]

    def _quorum(self) -> None:
        raise NotImplementedError

    def _send(self, quorum: bool = True) -> None:
        raise NotImplementedError

    def _start_round(self, fragment: Fragment, sending: Round) -> None:
        raise NotImplementedError

    def _apply(self) -> bool:
        raise NotImplementedError

    def _eager_step(self, started: float) -> bool:
        """The end of a window with eager outer steps: the round sent at the last one is applied (a resumed run's
        saved round is sent again first, blocking), then this window's round is sent and the next window starts
        where its outer step will about land (:meth:`Fragment.eager_restart`)."""
        committed, healed = False, False
        if self._resend is not None:
            healed = self._send_again()
        if self._in_flight is not None:
            committed = self._apply()
        else:
            self.last_sync = {}  # nothing was in flight: the run's first window, or right after a heal
        self._send(quorum=not healed)
        self.local_step = 0
        self.last_sync["sync_s"] = self._window_sync_s + time.perf_counter() - started
        return committed

    def _send_again(self) -> bool:
        """Take the quorum and send the round a checkpoint held; True when the quorum healed this group instead
        (the round belongs to a step the others have moved past: it is dropped, the quorum serves the next)."""
        saved, self._resend = self._resend, None
        assert saved is not None
        self._quorum()
        if self._healed:
            return True
        self._start_round(self._fragments[self.schedule.fragment_at(self._step_at_sync)], saved)
        return False
