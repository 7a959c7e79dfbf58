"""``faulty://``: a local filesystem that fails on purpose, for testing what storage faults do to training.

:func:`register` makes it known to fsspec in the calling process (``--checkpoint-dir faulty:///tmp/run``); a
trainer started as ``python -m torchx_diloco._fleet.faulty train ARGS...`` (what
:func:`torchx_diloco._fleet.testing.train_module_args` does for such ARGS) registers it, then runs the trainer.
Faults come from the environment variable ``TORCHX_DILOCO_FAULTS``, a JSON list of rules::

    [{"match": "step_00000003/global.pt", "action": "crash"},   # write half the bytes, then os._exit(137)
     {"match": "step_00000005/", "action": "error"},            # OSError(EIO) half way through the write
     {"match": "step_00000006/", "action": "full"},             # OSError(ENOSPC): disk full
     {"match": "step_00000003/", "action": "hold", "until": "/tmp/go"}]  # wait until /tmp/go exists, then write

A rule applies to every write whose path contains ``match``; other writes and all reads behave as local files.
``hold`` lets a test stop a trainer at a chosen step whatever the machine's speed: the trainer waits for its
background writer before its next sync, and the writer waits for the test.
"""

from __future__ import annotations

import errno
import json
import os
import runpy
import sys
import time
from typing import Any, Dict, List, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

FAULTS_ENV = "TORCHX_DILOCO_FAULTS"


def _fault_rules() -> List[Dict[str, Any]]:
    return json.loads(os.environ.get(FAULTS_ENV, "[]"))


class _FaultyFile:
    """Forwards to a real file; on close, writes half the data and fails as the matching rule says."""

    def __init__(self, real: Any, action: str, path: str) -> None:
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

    def __enter__(self) -> "_FaultyFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class FaultyFileSystem(LocalFileSystem):
    """``faulty://``: local files whose writes fail as the rules in ``TORCHX_DILOCO_FAULTS`` say."""

    protocol = ("faulty",)
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = path[len("faulty://") :] if str(path).startswith("faulty://") else path
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        rules = [r for r in _fault_rules() if r["match"] in str(path)] if "w" in mode or "a" in mode else []
        for rule in rules:
            while rule["action"] == "hold" and not os.path.exists(rule["until"]):
                time.sleep(0.05)
        real = super()._open(path, mode, *args, **kwargs)
        for rule in rules:
            if rule["action"] != "hold":
                return _FaultyFile(real, rule["action"], str(path))
        return real

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        with self.open(path, "wb") as f:
            f.write(value)


def register() -> None:
    """Make ``faulty://`` known to fsspec in this process (the tests that use it call this; nothing imports it
    into a process as a side effect)."""
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m torchx_diloco._fleet.faulty train ARGS...``: the trainer, in a process that knows ``faulty://``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["train"]:
        print("usage: python -m torchx_diloco._fleet.faulty train ARGS...", file=sys.stderr)
        return 2
    register()
    sys.argv = ["torchx_diloco.train", *args[1:]]
    runpy.run_module("torchx_diloco.train", run_name="__main__", alter_sys=True)
    return 0  # the trainer's own sys.exit ends the process first


if __name__ == "__main__":
    sys.exit(main())
