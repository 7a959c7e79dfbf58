"""One run per checkpoint folder: a lease the run holds while it lives, which a run with another id refuses.

``<checkpoint_dir>/LEASE.json`` names the holder (its run, host and process) and when it last renewed it; the
run renews it every quarter of its ``ttl_s`` (``--checkpoint-lease-s``). While it is fresh, a run with another id
is refused in one line (before launch by the components, at start by the trainer) and writes nothing there.
All groups of one run share the lease: the run is its run id (TorchX's app id, which a Slurm requeue keeps, or
``--run_id`` for groups submitted as separate jobs), or, for groups started without one, their lighthouse's
address (groups of one run share a lighthouse). A run that ends, or is stopped (SIGTERM, Ctrl-C), releases the
lease. One that died leaves it to go stale ``ttl_s`` after its last renewal, or at once for a run starting on the
host the dead holder ran on (its process is seen to be gone); then any run takes the folder over.
``--take-over`` takes it at once; the run that held it finds out at its next renewal and stops.

Taking the lease is a compare-and-swap, so two runs never both believe they hold it:
- on a local (or mounted) disk: an exclusive ``flock`` around read, compare and replace;
- on S3: conditional writes (``If-None-Match: *`` to create, ``If-Match: <etag>`` to replace), which AWS S3
  and the moto server implement (some S3-compatible stores do not: then it is as below);
- in ``memory://`` (one process): a lock;
- elsewhere: read, compare, write; two runs starting within the same moment on such a filesystem could both
  take a stale lease.
Staleness compares the holder's clock (``renewed``) with the reader's: hosts sharing a folder need synced clocks.

Imports no torch: the components check the lease before launch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Tuple

import fsspec

from torchx_diloco.errors import UserError

logger = logging.getLogger(__name__)

LEASE_FILE = "LEASE.json"
_MEMORY_LOCK = threading.Lock()


def run_identity(run_id: Optional[str], lighthouse: str) -> str:
    """Who a group's run is, for the lease and the manifests: its run id, else its lighthouse's address."""
    return run_id or f"lighthouse {lighthouse}"


@dataclass(frozen=True)
class Holder:
    """What the lease file says."""

    run: str
    host: str
    pid: int
    renewed: float  # the holder's time.time() at its last renewal
    ttl_s: float

    def age(self) -> float:
        return time.time() - self.renewed

    def fresh(self) -> bool:
        """Renewed within its time-to-live, and not by a process of this host that is gone."""
        return self.age() < self.ttl_s and not self.died_here()

    def died_here(self) -> bool:
        """Its process ran on this host and exists no more (killed, crashed): no need to wait for the lease to go
        stale. (Another host's process cannot be seen from here; a reused pid only makes us wait.)"""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return False


class LeaseHeld(UserError):
    """The checkpoint folder is held by another live run."""


def _parse(data: Optional[bytes]) -> Optional[Holder]:
    if data is None:
        return None
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return Holder("(an unreadable lease)", "?", 0, 0.0, 0.0)  # stale: anyone may replace it


class Lease:
    """The lease on the checkpoint folder ``url`` of run ``run``."""

    def __init__(self, url: str, run: str, ttl_s: float) -> None:
        self.fs, root = fsspec.core.url_to_fs(url)
        self.url, self.run, self.ttl_s = url, run, ttl_s
        self.root = root.rstrip("/")
        self.path = f"{self.root}/{LEASE_FILE}"
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self._kind = {"file": "local", "local": "local", "memory": "memory", "s3": "s3", "s3a": "s3"}.get(protocol)
        self.lost = threading.Event()  # another run took the folder over
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- reading -------------------------------------------------------------------------------------------
    def _read(self) -> Optional[bytes]:
        try:
            if self._kind != "local":
                self.fs.invalidate_cache(self.root)
            return self.fs.cat_file(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def holder(self) -> Optional[Holder]:
        return _parse(self._read())

    def refusal(self, holder: Holder) -> str:
        """The one line a run of another id gets while ``holder`` is fresh."""
        return (
            f"--checkpoint-dir {self.url} is held by run {holder.run!r} (host {holder.host}, pid {holder.pid}, "
            f"renewed {holder.age():.0f}s ago; it goes stale {holder.ttl_s:g}s after its last renewal): pass another "
            "--checkpoint-dir, or wait for that run to end or stop it, or take the folder over with --take-over"
        )

    def check(self, take_over: bool = False) -> None:
        """Refuse (``LeaseHeld``) while another run holds the folder; reads only. A folder that cannot be read is
        left for the writability check to explain."""
        try:
            holder = self.holder()
        except OSError:
            return
        if holder is not None and holder.run != self.run and holder.fresh() and not take_over:
            raise LeaseHeld(self.refusal(holder))

    # --- taking, renewing, releasing -----------------------------------------------------------------------
    def _mine(self) -> bytes:
        holder = Holder(self.run, socket.gethostname(), os.getpid(), time.time(), self.ttl_s)
        return json.dumps(asdict(holder)).encode()

    def acquire(self, take_over: bool = False) -> None:
        """Hold the folder: create the lease, renew ours, or replace a stale one (any one with ``take_over``)."""
        for _ in range(100):
            current = self._read()
            holder = _parse(current)
            if holder is not None and holder.run != self.run and holder.fresh() and not take_over:
                raise LeaseHeld(self.refusal(holder))
            if self._swap(current, self._mine()):
                if holder is not None and holder.run != self.run:
                    logger.warning(
                        "took --checkpoint-dir %s over from run %r (renewed %.0fs ago)",
                        self.url,
                        holder.run,
                        holder.age(),
                    )
                return
        raise RuntimeError(f"could not take the lease {self.path}: it kept changing")

    def renew(self) -> bool:
        """Renew our hold; False (and ``lost`` set) when another run has taken the folder over."""
        for _ in range(100):
            current = self._read()
            holder = _parse(current)
            if holder is not None and holder.run != self.run:
                self.lost.set()
                return False
            if self._swap(current, self._mine()):  # (absent: a group of ours released it; hold it again)
                return True
        raise RuntimeError(f"could not renew the lease {self.path}: it kept changing")

    def start(self) -> None:
        """Renew in the background every quarter of the time-to-live."""

        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    if not self.renew():
                        holder = self.holder()
                        taker = holder.run if holder is not None else "?"
                        logger.error("run %r took --checkpoint-dir %s over: this run stops", taker, self.url)
                        return
                except Exception as e:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                    logger.warning("could not renew the lease on %s (%s: %s)", self.url, type(e).__name__, e)

        self._thread = threading.Thread(target=beat, name="checkpoint-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (another run may then take the folder)."""
        self.stop()
        with self._locked():
            holder = self.holder()
            if holder is not None and holder.run == self.run:
                self.fs.rm_file(self.path)

    def check_held(self) -> None:
        """Raise (one line) once another run has taken the folder over."""
        if self.lost.is_set():
            raise UserError(
                f"another run took --checkpoint-dir {self.url} over (--take-over): this run stops; its checkpoints "
                "so far stay in that folder's history"
            )

    # --- compare and swap ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._kind == "memory":
            with _MEMORY_LOCK:
                yield
        elif self._kind == "local":
            import fcntl

            self.fs.makedirs(self.root, exist_ok=True)
            with open(f"{self.root}/.{LEASE_FILE}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        else:
            yield

    def _swap(self, expected: Optional[bytes], new: bytes) -> bool:
        """Write ``new`` if the lease still holds ``expected`` (None: absent); False if it changed meanwhile."""
        if self._kind == "s3":
            return self._swap_s3(expected, new)
        with self._locked():
            if self._read() != expected:
                return False
            self.fs.makedirs(self.root, exist_ok=True)
            if self._kind == "local":
                tmp = f"{self.path}.{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    f.write(new)
                os.replace(tmp, self.path)  # readers see the old lease or the new one, never half of one
            else:
                self.fs.pipe_file(self.path, new)
            return True

    def _swap_s3(self, expected: Optional[bytes], new: bytes) -> bool:
        condition: Tuple[str, Any]
        if expected is None:
            condition = ("mode", "create")
        else:  # a single PUT's ETag is the MD5 of its body
            condition = ("IfMatch", f'"{hashlib.md5(expected).hexdigest()}"')
        try:
            self.fs.pipe_file(self.path, new, **dict([condition]))
        except (FileExistsError, OSError) as e:
            if "pre-condition" in str(e) or isinstance(e, FileExistsError):
                return False
            raise
        return True
