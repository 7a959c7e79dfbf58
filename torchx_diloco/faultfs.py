"""``faulty://``: a local filesystem that fails on purpose, for testing what storage faults do to training.

Registered with fsspec (entry point ``fsspec.specs``), so ``--checkpoint-dir faulty:///tmp/run`` works in any
process. Faults come from the environment variable ``TORCHX_DILOCO_FAULTS``, a JSON list of rules::

    [{"match": "step_00000003/global.pt", "action": "crash"},   # write half the bytes, then os._exit(137)
     {"match": "step_00000005/", "action": "error"},            # OSError(EIO) half way through the write
     {"match": "step_00000006/", "action": "full"}]             # OSError(ENOSPC): disk full

A rule applies to every write whose path contains ``match``; other writes and all reads behave as local files.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any, Dict, List

from fsspec.implementations.local import LocalFileSystem

FAULTS_ENV = "TORCHX_DILOCO_FAULTS"


def _rules() -> List[Dict[str, Any]]:
    return json.loads(os.environ.get(FAULTS_ENV, "[]"))


class _FaultyFile:
    """Forwards to a real file; on close, writes half the data and fails as the matching rule says."""

    def __init__(self, real, action: str, path: str) -> None:
        self._real, self._action, self._path, self._buf = real, action, path, bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def close(self) -> None:
        if self._real.closed:
            return
        self._real.write(bytes(self._buf[: len(self._buf) // 2]))
        self._real.flush()
        if self._action == "crash":
            os.fsync(self._real.fileno())
            os._exit(137)  # as if SIGKILLed mid-write
        self._real.close()
        if self._action == "full":
            raise OSError(errno.ENOSPC, f"No space left on device (injected): {self._path}")
        raise OSError(errno.EIO, f"Input/output error (injected): {self._path}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str):
        return getattr(self._real, name)


class FaultyFileSystem(LocalFileSystem):
    protocol = ("faulty",)
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("faulty://"):] if str(path).startswith("faulty://") else path
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", *args, **kwargs):
        real = super()._open(path, mode, *args, **kwargs)
        if "w" in mode or "a" in mode:
            for rule in _rules():
                if rule["match"] in str(path):
                    return _FaultyFile(real, rule["action"], str(path))
        return real

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        with self.open(path, "wb") as f:
            f.write(value)
