"""``--sync-every auto:H``: groups of other speeds reach each sync at about the same time (DyLU, arXiv 2401.09135).

The fastest group of the run takes H inner steps per outer step; every other group takes proportionally fewer,
``H x fastest step time / its own`` (at least 1), from the step times measured in the last round. The first round
uses H for all. Each group writes its mean step time into its own slot of the sync's header (summed over the
quorum, so every group sees every group's time, a group that was not there as 0), and decides its next H from
that alone; the ranks of a group take rank 0's decision. The average of the round is weighted by the tokens each
group trained on (:mod:`torchx_diloco.exchange`), so the slower group's fewer steps count for what they are.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence


class AutoH(int):
    """The parsed ``auto:H``: H of the fastest group, marked to adapt (an ``int`` everywhere else: the run's clock,
    its learning-rate schedule and its checks count in H)."""

    def __repr__(self) -> str:
        return f"auto:{int(self)}"

    __str__ = __repr__


def next_sync_every(top: int, times: Sequence[float], own: float) -> int:
    """A group's H for the next round: ``top`` scaled by the fastest measured step time over its own (``times``:
    every group's, 0 where none was measured), between 1 and ``top``; ``top`` while it measured nothing."""
    measured = [t for t in times if t > 0]
    if own <= 0 or not measured:
        return top
    return max(1, min(top, round(top * min(measured) / own)))


class StepTimer:
    """A group's mean inner step time since the last sync: the time between the end of one ``DiLoCo.step()`` call
    and the start of the next, which is the caller's inner step (forward, backward, optimizer)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._last_end: float | None = None
        self._seconds, self._steps = 0.0, 0

    @contextmanager
    def outside_inner_step(self) -> Iterator[None]:
        """Around a ``DiLoCo.step()`` call: the time since the last one ended was an inner step."""
        if self._last_end is not None:
            self._seconds += self.clock() - self._last_end
            self._steps += 1
        try:
            yield
        finally:
            self._last_end = self.clock()

    def take(self) -> float:
        """The mean step time since the last ``take`` (0.0: nothing measured), and start over."""
        mean = self._seconds / self._steps if self._steps else 0.0
        self._seconds, self._steps = 0.0, 0
        return mean


class Pacer:
    """auto:H for one group of ``groups``: times its inner steps, writes their mean into its own slot of a sync's
    header (slots from ``first_slot`` on, one per group) and reads every group's back for its next H."""

    def __init__(self, top: int, group: int, groups: int, first_slot: int, clock: Callable[[], float]) -> None:
        if not 0 <= group < groups:
            raise ValueError(f"group {group} must be within 0..groups-1 = {groups - 1} (each group has a slot)")
        self.top, self.group, self.first_slot = top, group, first_slot
        self.timer = StepTimer(clock)

    def stamp(self, header: Any) -> None:
        """This group's mean step time since the last sync, into its slot of the header it sends."""
        header[self.first_slot + self.group] = self.timer.take()

    def next_sync_every(self, summed_header: Any) -> int:
        """This group's H for the next window, from every group's time in the quorum's summed header."""
        times = [float(t) for t in summed_header[self.first_slot :]]
        return next_sync_every(self.top, times, times[self.group])
