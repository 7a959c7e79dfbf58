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
from typing import Callable, Sequence


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

    def step_started(self) -> None:
        if self._last_end is not None:
            self._seconds += self.clock() - self._last_end
            self._steps += 1

    def step_ended(self) -> None:
        self._last_end = self.clock()

    def take(self) -> float:
        """The mean step time since the last ``take`` (0.0: nothing measured), and start over."""
        mean = self._seconds / self._steps if self._steps else 0.0
        self._seconds, self._steps = 0.0, 0
        return mean
