"""The I/O pieces the store and the DCP format share (a leaf: it imports neither of them)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional


class HashingStream:
    """A write stream that checksums what passes through it. A large write is hashed on another thread while this
    one writes it (hashlib and file writes release the GIL): the checksum overlaps the write instead of adding
    to it. Each write returns only once both are done, so the caller may reuse its buffer."""

    _OVERLAP_FROM = 1 << 20  # smaller writes are hashed inline: a thread hand-off would cost more

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes < self._OVERLAP_FROM:
            self._sha.update(view)
            written = self._stream.write(view)
        else:
            hashed = _hasher().submit(self._sha.update, view)
            written = self._stream.write(view)
            hashed.result()
        self.bytes += view.nbytes
        return view.nbytes if written is None else written

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, ...: the stream's own
        return getattr(self._stream, name)


_HASHER: Optional[ThreadPoolExecutor] = None


def _hasher() -> ThreadPoolExecutor:
    global _HASHER
    if _HASHER is None:
        _HASHER = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-sha256")
    return _HASHER


class CorruptCheckpoint(Exception):
    """A checkpoint part that is missing, truncated, altered or unsafe to load."""


def is_local(fs: Any) -> bool:
    """A local file system (streamed writes), not an object store (whole-object PUTs)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
