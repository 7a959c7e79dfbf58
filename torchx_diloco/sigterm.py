"""Act on SIGTERM at once, even while the main thread is blocked in native code.

Python runs a signal handler in the main thread only, between two bytecodes: a trainer blocked in a collective or
a quorum (for up to its timeout) runs it only once that call returns, after Slurm's ``KillWait`` (30 s by default)
or torchrun's grace period has SIGKILLed it. Python's C-level handler, though, writes each signal's number to the
wakeup fd the moment the signal arrives, in whatever thread: a thread reading that fd acts at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

_lock = threading.RLock()  # re-entrant: the handler may interrupt the main thread inside on_sigterm or cancel
_callbacks: List[Callable[[], None]] = []


@dataclass
class _Installed:
    reader: int
    writer: int
    previous_fd: int  # whoever had the wakeup fd before (an asyncio loop) still gets its signals
    previous_handler: Any
    ran: bool = False


_installed: Optional[_Installed] = None


def on_sigterm(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` (once, best effort) as soon as this process gets SIGTERM, then die of it as before (a
    previous Python handler runs first). Returns what unregisters it. Call from the main thread; elsewhere, or
    where SIGTERM is ignored, nothing is installed."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        return lambda: None
    with _lock:
        _callbacks.append(callback)
        if _installed is None:
            _install()

    def cancel() -> None:
        with _lock, contextlib.suppress(ValueError):
            _callbacks.remove(callback)

    return cancel


def _run_callbacks() -> None:
    with _lock:  # a second caller (the handler after the watcher) waits for the first to finish
        if _installed is None or _installed.ran:
            return
        _installed.ran = True
        for callback in list(_callbacks):
            with contextlib.suppress(Exception):
                callback()


def _install() -> None:
    global _installed
    reader, writer = os.pipe()  # (a socketpair's write from the C handler fails with EINVAL under gVisor)
    os.set_blocking(writer, False)  # set_wakeup_fd's requirement: a full pipe must not block the signal handler
    previous_fd = signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
    installed = _installed = _Installed(reader, writer, previous_fd, signal.getsignal(signal.SIGTERM))

    def watch() -> None:
        while True:
            try:
                data = os.read(reader, 64)
            except OSError:  # closed in a forked child
                return
            if not data or _installed is not installed:
                return
            if previous_fd >= 0:
                with contextlib.suppress(OSError):
                    os.write(previous_fd, data)
            if int(signal.SIGTERM) in data:
                _run_callbacks()

    def handler(signum: int, frame: Any) -> None:
        _run_callbacks()
        if callable(installed.previous_handler):
            installed.previous_handler(signum, frame)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker, a process the zygote forks) shares the parent's pipe: its SIGTERM
    would run the parent's callbacks. It starts as the parent was before :func:`on_sigterm`."""
    global _installed, _lock
    _lock = threading.RLock()  # (another thread may have held it at the fork)
    _callbacks.clear()
    if _installed is None:
        return
    installed, _installed = _installed, None
    with contextlib.suppress(ValueError, OSError, TypeError):
        signal.set_wakeup_fd(installed.previous_fd)
        signal.signal(signal.SIGTERM, installed.previous_handler or signal.SIG_DFL)
    for fd in (installed.reader, installed.writer):
        with contextlib.suppress(OSError):
            os.close(fd)


os.register_at_fork(after_in_child=_forget_in_child)
