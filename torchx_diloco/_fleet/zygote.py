"""The test fleet's trainer and lighthouse processes and its ``torchx`` CLI calls, forked from one interpreter that
has imported them already.

A fresh ``python -m torchx_diloco.train`` spends about 4.5 s of CPU before its first line of training: 2.5 s
importing torch and torchft, 2 s importing ``torch._dynamo``, which torch's optimizers import on their first call.
The suite starts a few hundred of them on two cores. The zygote pays that once per test worker: it imports them,
then forks one real process per request, which takes its own session, log, working directory, environment and
thread count and runs the module as ``__main__`` (as ``python -m`` does), so tests see what they would see. A
``torchx`` call (about 0.7 s of imports each; the suite makes about a hundred, most of them dry runs) is TorchX's
CLI module run the same way (:func:`torchx_diloco._fleet.testing.run_cli`).

Only for ``[python, -m, <one of MODULES>, ...]`` and an environment whose interpreter-start settings
(``PYTHONPATH`` and the like) match the zygote's; anything else starts a fresh interpreter, as does everything when
``TORCHX_DILOCO_ZYGOTE`` is not ``1`` (tests/conftest.py sets it; benchmarks do not). Forked children are the
zygote's, not ours: their exit codes come back over its socket, and ``/proc/<pid>/environ`` shows the zygote's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

ZYGOTE_ENV = "TORCHX_DILOCO_ZYGOTE"
# the trainer, the lighthouse, and TorchX's CLI (what the ``torchx`` script runs: ``torchx run``, dry runs included)
MODULES = ("torchx_diloco.train", "torchx_diloco.lighthouse", "torchx.cli.main")
# and what those import later: the optimizers' dynamo, our components and the schedulers TorchX loads by entry point
PRELOAD = (*MODULES, "torch._dynamo", "torchx_diloco_components.diloco", "torchx_diloco.local", "torchx_diloco.slurm")
# read when an interpreter starts: a child that asks for other values gets a fresh interpreter
STARTUP_VARS = ("PYTHONPATH", "PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONFAULTHANDLER", "PYTHONDEVMODE", "TORCH_LOGS")


# --- the wire: length-prefixed JSON messages over a socket pair ------------------------------------------------
def _send(sock: socket.socket, message: Dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    chunks = b""
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return chunks


def _recv(sock: socket.socket) -> Optional[Dict[str, Any]]:
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    body = _recv_exact(sock, struct.unpack("!I", head)[0])
    return None if body is None else json.loads(body)


# --- the zygote (its own process) ------------------------------------------------------------------------------
def _run_child(request: Dict[str, Any]) -> None:
    """In the forked child: become the process ``python -m MODULE ARGS`` would have been, run it, exit."""
    code: Any = 1
    try:
        os.setsid()
        for fd, path in ((1, request["log"]), (2, request.get("err") or request["log"])):
            log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, fd)
            os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if "fsspec.config" in sys.modules:  # fsspec reads FSSPEC_* (an S3 endpoint) when it is imported
            from fsspec import config

            config.conf.clear()
            config.set_conf_files(os.environ.get("FSSPEC_CONFIG_DIR", config.default_conf_dir), config.conf)
            config.set_conf_env(config.conf)
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdout = open(1, "w", buffering=1 if unbuffered else -1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        if "OMP_NUM_THREADS" in os.environ:
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        script = request.get("argv0")  # a console script that runs the module's main (`torchx`)
        # `python -m` puts the working directory first, a script its own directory
        sys.path[0] = os.path.dirname(os.path.abspath(script)) if script else os.getcwd()
        sys.argv = [script or request["module"], *request["args"]]
        _as_if_imported_here(request["module"])
        import runpy

        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        import warnings

        # (runpy's warning that the module was imported before it ran as __main__: the zygote imported it)
        warnings.filterwarnings("ignore", ".*found in sys.modules after import of package", RuntimeWarning)
        # (alter_sys would make sys.argv[0] the module's file: a script's usage lines name the script)
        runpy.run_module(request["module"], run_name="__main__", alter_sys=not script)
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - an interpreter prints any escaping exception and exits 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        # what an interpreter does on its way out: wait for its threads, run atexit, flush
        try:
            threading._shutdown()  # type: ignore[attr-defined]
            import atexit

            atexit._run_exitfuncs()
        except BaseException:  # noqa: BLE001 - exiting regardless, as an interpreter does
            pass
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(code or 0)


def _as_if_imported_here(module: str) -> None:
    """What a module computed from its process's working directory when the zygote imported it, computed again
    in the child: TorchX finds ``.torchxconfig`` in the directories of ``DEFAULT_CONFIG_DIRS``, set at its import
    (registered in torchx_diloco/upstream.py)."""
    if module == "torchx.cli.main":
        from pathlib import Path

        from torchx.runner import config

        config.DEFAULT_CONFIG_DIRS = [str(Path.home()), str(Path.cwd())]


def serve(fd: int) -> None:
    """The zygote's loop: fork a child per request (only while this process has one thread), report exits."""
    import importlib
    import select

    for name in PRELOAD:
        importlib.import_module(name)
    sock = socket.socket(fileno=fd)
    # importing torch starts one native thread of its own (forked past, as DataLoader workers are); any more, or a
    # Python thread, and forking is unsafe
    native_threads = len(os.listdir("/proc/self/task"))
    while True:
        ready, _, _ = select.select([sock], [], [], 0.05)
        if ready:
            request = _recv(sock)
            if request is None:  # the test process is gone
                return
            if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) > native_threads:
                _send(sock, {"id": request["id"], "pid": None})  # forking a threaded process is unsafe
                continue
            pid = os.fork()
            if pid == 0:
                sock.close()
                _run_child(request)
            _send(sock, {"id": request["id"], "pid": pid})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _send(sock, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


# --- the test process's side -----------------------------------------------------------------------------------
class ForkedProcess:
    """The parts of ``subprocess.Popen`` the fleet uses, for a child of the zygote."""

    def __init__(self, zygote: "Zygote", pid: int, argv: Sequence[str]) -> None:
        self.zygote, self.pid, self.args = zygote, pid, list(argv)
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            code = self.zygote.exit_code(self.pid, timeout=timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygote:
    """One zygote process for this test process, started on first use."""

    _instance: Optional["Zygote"] = None
    _lock = threading.Lock()

    def __init__(self, python: str, env: Mapping[str, str]) -> None:
        ours, theirs = socket.socketpair()
        self.env = dict(env)
        self.proc = subprocess.Popen(
            [python, "-m", "torchx_diloco._fleet.zygote", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=self.env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock = ours
        self._cond = threading.Condition()
        self._replies: Dict[int, Optional[int]] = {}
        self._exits: Dict[int, int] = {}
        self._next_id = 0
        self._closed = False
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    @classmethod
    def shared(cls, python: str, env: Mapping[str, str]) -> "Zygote":
        with cls._lock:
            if cls._instance is None or cls._instance._closed:
                cls._instance = cls(python, env)
            return cls._instance

    def _read(self) -> None:
        while True:
            try:
                message = _recv(self.sock)
            except OSError:
                message = None
            with self._cond:
                if message is None:
                    self._closed = True
                elif "exited" in message:
                    self._exits[message["exited"]] = message["code"]
                else:
                    self._replies[message["id"]] = message["pid"]
                self._cond.notify_all()
            if message is None:
                return

    def accepts(self, argv: Sequence[str], env: Mapping[str, str], python: str) -> bool:
        """Whether ``argv`` in ``env`` is what a fork of this zygote can be."""
        return (
            len(argv) >= 3
            and argv[0] == python
            and argv[1] == "-m"
            and argv[2] in MODULES
            and all(env.get(k) == self.env.get(k) for k in STARTUP_VARS)
        )

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        log: Path,
        err: Optional[Path] = None,
        argv0: Optional[str] = None,
    ) -> Optional[ForkedProcess]:
        """A forked ``argv`` (see :meth:`accepts`), or None when the zygote cannot fork now (start it fresh).
        ``err``: stderr to a file of its own (else into ``log``); ``argv0``: the program's ``sys.argv[0]``."""
        with self._cond:
            if self._closed:
                return None
            request_id, self._next_id = self._next_id, self._next_id + 1
        request = {"id": request_id, "module": argv[2], "args": list(argv[3:]), "env": dict(env)}
        request.update(cwd=str(cwd), log=str(log), err=str(err) if err else None, argv0=argv0)
        with self._send_lock:
            _send(self.sock, request)
        with self._cond:
            self._cond.wait_for(lambda: request_id in self._replies or self._closed)
            pid = self._replies.pop(request_id, None)
        return None if pid is None else ForkedProcess(self, pid, argv)

    def exit_code(self, pid: int, timeout: Optional[float]) -> Optional[int]:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self._closed, timeout=timeout)
            if pid not in self._exits and self._closed:
                raise RuntimeError(f"the zygote died: process {pid}'s exit code is lost")
            return self._exits.get(pid)


def enabled() -> bool:
    return os.environ.get(ZYGOTE_ENV) == "1"


def maybe_fork(
    argv: Sequence[str],
    env: Optional[Mapping[str, str]],
    cwd: Path,
    log: Path,
    python: str,
    err: Optional[Path] = None,
    argv0: Optional[str] = None,
) -> Optional[ForkedProcess]:
    """``argv`` forked from the zygote when it can be (:mod:`this module <torchx_diloco._fleet.zygote>`), else None."""
    if not enabled():
        return None
    env = dict(os.environ) if env is None else env
    zygote = Zygote.shared(python, {k: v for k, v in os.environ.items() if k != ZYGOTE_ENV})
    if not zygote.accepts(argv, env, python):
        return None
    return zygote.spawn(argv, env, cwd, log, err, argv0)


def _main(argv: List[str]) -> None:
    serve(int(argv[0]))


if __name__ == "__main__":
    _main(sys.argv[1:])
