"""The background writer: storage work off the training thread, at most one job in flight."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

logger = logging.getLogger(__name__)


class AsyncWriter:
    """Runs storage work off the training thread, at most one job in flight.

    A failed job is logged once and dropped: training goes on and the next job tries again.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._inflight: Optional[Future] = None
        self.failures = 0

    def submit(self, job: Callable[[], None], what: str) -> None:
        self.wait()
        self._inflight = self._pool.submit(self._run, job, what)

    def _run(self, job: Callable[[], None], what: str) -> None:
        try:
            job()
        except Exception as e:  # noqa: BLE001 - storage faults must not stop training; they are logged
            self.failures += 1
            logger.error(
                "%s failed (training goes on, the previous checkpoint stays): %s: %s", what, type(e).__name__, e
            )

    def wait(self) -> None:
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None

    def close(self) -> None:
        self.wait()
        self._pool.shutdown(wait=True)
