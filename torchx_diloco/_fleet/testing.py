"""A local fleet for tests, benchmarks and scripts: lighthouses and replica groups as real processes.

Shared by ``tests/``, ``benchmarks/`` and ``scripts/`` (as torchft's ``_test_utils.py`` and TorchX's
``component_test_base.py`` serve theirs), so that every one of them starts groups the same way: the same
command lines, the same scrubbed environment, one thread per group, logs in files. It imports neither pytest
nor torch (benchmark scripts import it before they need either), nor the trainer.

A trainer whose arguments name a ``faulty://`` URL is started through :mod:`torchx_diloco._fleet.faulty`, which
registers that filesystem first (:func:`train_module_args`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import fsspec

from torchx_diloco._fleet.zygote import maybe_fork

REPO = Path(__file__).resolve().parents[2]  # the checkout: torchx_diloco/_fleet/testing.py
PYTHON = sys.executable
BIN = Path(PYTHON).parent  # this environment's scripts: torchrun, torchx
TORCHRUN = str(BIN / "torchrun")

# --- environments ----------------------------------------------------------------------------------------------
# Set by a launcher (torchrun, TorchX, Slurm) for what it starts: inherited, they would point a child at the
# rendezvous of the process that runs the tests, or make it a replica group of someone else's run.
LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
GROUP_VARS = ("REPLICA_GROUP_ID", "NUM_REPLICA_GROUPS", "TORCHFT_LIGHTHOUSE", "TORCHFT_MANAGER_PORT")
TORCHX_VARS = ("TORCHXCONFIG", "TORCHX_DILOCO_GPUS")  # a user's TorchX settings would change what a test runs


def clean_env(**overrides: str) -> Dict[str, str]:
    """This process's environment without the launcher, group and TorchX variables, plus ``overrides``."""
    drop = {*LAUNCHER_VARS, *GROUP_VARS, *TORCHX_VARS}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(overrides)
    return env


def cli_env(**overrides: str) -> Dict[str, str]:
    """For ``torchx`` CLI runs: :func:`clean_env` with this environment's scripts first on PATH (torchx, torchrun)."""
    return clean_env(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **overrides)


def run_cli(
    argv: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float
) -> "subprocess.CompletedProcess[str]":
    """``subprocess.run(argv, capture_output=True, text=True)``, forked from the tests' zygote when it can be: a
    ``python -m`` of a module it has imported, or this environment's ``torchx`` script (TorchX's CLI module as
    ``__main__``, as the script runs it)."""
    script = shutil.which(argv[0], path=env.get("PATH")) if argv else None
    command, argv0 = list(argv), None
    if script is not None and Path(script) == BIN / "torchx":
        command, argv0 = [PYTHON, "-m", "torchx.cli.main", *argv[1:]], script
    with tempfile.TemporaryDirectory(prefix="captured-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        forked = maybe_fork(command, env, Path(cwd), out, PYTHON, err=err, argv0=argv0)
        if forked is not None:
            try:
                code = forked.wait(timeout)
            except subprocess.TimeoutExpired:
                forked.kill()
                raise
            return subprocess.CompletedProcess(list(argv), code, _text_of(out), _text_of(err))
    return subprocess.run(list(argv), cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout)


def _text_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def group_env(group: int, groups: int, lighthouse: str, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment of one replica group: its id, the group count, the lighthouse, one thread.

    One thread: the groups share this machine's cores, and more threads than cores only slow every group down.
    """
    env = clean_env(
        REPLICA_GROUP_ID=str(group),
        NUM_REPLICA_GROUPS=str(groups),
        TORCHFT_LIGHTHOUSE=lighthouse,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes -------------------------------------------------------------------------------------------------
def kill_pid(pid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal ``pid``; False when it is already gone (a process may exit between finding and killing it)."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def train_module_args(args: Sequence[str]) -> List[str]:
    """``-m torchx_diloco.train ARGS``; through :mod:`torchx_diloco._fleet.faulty` when ARGS name ``faulty://``
    (it registers that filesystem before it runs the trainer)."""
    if any("faulty://" in a for a in args):
        return ["-m", "torchx_diloco._fleet.faulty", "train", *args]
    return ["-m", "torchx_diloco.train", *args]


class Proc:
    """A child process in its own session, appending to a log file; :meth:`kill` ends the whole session."""

    def __init__(
        self, argv: Sequence[str], log: Path, env: Optional[Mapping[str, str]] = None, cwd: Optional[Path] = None
    ) -> None:
        self.argv = list(argv)
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd or REPO
        self.proc: subprocess.Popen = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        forked = maybe_fork(self.argv, self.env, self.cwd, self.log, PYTHON)  # (tests only: _fleet/zygote.py)
        if forked is not None:
            return forked  # type: ignore[return-value]
        with open(self.log, "ab") as out:
            return subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait(self, timeout: float = 240) -> int:
        """The exit code; past ``timeout`` the process is killed and RuntimeError says where its log ended."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            tail = self.output()[-3000:]
            raise RuntimeError(f"{shlex.join(self.argv)} did not finish in {timeout:g}s:\n{tail}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Lighthouse(Proc):
    """``python -m torchx_diloco.lighthouse`` on a free port, answering when the constructor returns.

    ``netns``: run it in that network namespace (it is then unreachable from here: its banner says it is up).
    ``host``: its ``--bind-host`` (default: the lighthouse's own default, loopback). ``extra``: more flags.
    """

    def __init__(
        self,
        log_dir: Path,
        min_replicas: int = 1,
        idle_exit: float = 3.0,
        port: Optional[int] = None,
        extra: Sequence[str] = (),
        netns: Optional[str] = None,
        host: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: float = 30,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://{'localhost' if host in (None, '127.0.0.1') else host}:{self.port}"
        self.netns, self.timeout = netns, timeout
        argv = [
            *(["ip", "netns", "exec", netns] if netns else []),
            PYTHON,
            "-m",
            "torchx_diloco.lighthouse",
            "--port",
            str(self.port),
            *(["--bind-host", host] if host else []),
            "--min-replicas",
            str(min_replicas),
            "--idle-exit",
            str(idle_exit),
            "--join-timeout-ms",
            "2000",
            *extra,
        ]
        super().__init__(argv, Path(log_dir) / f"lighthouse-{self.port}.log", env=env)
        self._wait_ready(0)

    def start(self) -> None:
        """Start it again, same port and flags (after :meth:`kill`): a lighthouse with an empty state."""
        seen = len(self.output())
        self.proc = self._spawn()
        self._wait_ready(seen)

    def _wait_ready(self, log_from: int) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.netns:
                if "serving on" in self.output()[log_from:]:
                    return
            else:
                try:
                    urllib.request.urlopen(f"{self.url}/status", timeout=1).read()
                    return
                except OSError:
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the lighthouse exited before it answered:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the lighthouse did not answer in {self.timeout:g}s:\n{self.output()[-3000:]}")


class Group(Proc):
    """One replica group, ``python -m torchx_diloco.train ARGS`` in ``log_dir``, logging to ``group<g><tag>.log``.

    ``max_restarts``: run it under ``torchrun --standalone`` instead, which restarts a killed worker up to that
    many times (what the TorchX component does); :meth:`worker` finds that worker. ``nproc`` > 1: that many
    ranks in the group (``torchrun --nproc_per_node``, restarts default 0), DDP between them over Gloo on CPU.
    """

    def __init__(
        self,
        group: int,
        groups: int,
        lighthouse: str,
        args: Sequence[str],
        log_dir: Path,
        extra_env: Optional[Mapping[str, str]] = None,
        tag: str = "",
        max_restarts: Optional[int] = None,
        nproc: int = 1,
    ) -> None:
        self.group, self.lighthouse, self.nproc = group, lighthouse, nproc
        self.torchrun = max_restarts is not None or nproc > 1
        launcher = (
            [
                TORCHRUN,
                "--standalone",
                "--nnodes",
                "1",
                "--nproc_per_node",
                str(nproc),
                "--max_restarts",
                str(max_restarts or 0),
            ]
            if self.torchrun
            else [PYTHON]
        )
        super().__init__(
            [*launcher, *train_module_args(args)],
            Path(log_dir) / f"group{group}{tag}.log",
            env=group_env(group, groups, lighthouse, extra_env),
            cwd=Path(log_dir),
        )

    def worker(self) -> Optional[int]:
        """The live training process under torchrun (torchrun's child), None between two of its lives."""
        found = self.workers()
        return found[0] if found else None

    def workers(self) -> List[int]:
        """The live training processes under torchrun (one per rank), lowest group rank first."""
        found = train_workers(REPLICA_GROUP_ID=str(self.group), TORCHFT_LIGHTHOUSE=self.lighthouse)
        return [int(e["PID"]) for e in sorted(found, key=lambda e: int(e.get("RANK", "0")))]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The session; under torchrun first the agent (so it restarts nothing), then the workers, which
        torchrun starts in sessions of their own."""
        workers = self.workers() if self.torchrun else []
        super().kill(sig)
        for worker in workers:
            kill_pid(worker, sig)


def run_groups(groups: int, lighthouse: str, args: Sequence[str], log_dir: Path, timeout: float = 240) -> List[Group]:
    """Start ``groups`` groups, wait for all; assert each exited 0."""
    procs = [Group(g, groups, lighthouse, args, log_dir) for g in range(groups)]
    for p in procs:
        rc = p.wait(timeout)
        assert rc == 0, f"group {p.group} exited {rc}:\n{p.output()[-3000:]}"
    return procs


def train_once(
    args: Sequence[str], env: Optional[Mapping[str, str]] = None, timeout: float = 120, cwd: Optional[Path] = None
) -> subprocess.CompletedProcess:
    """The training module in the foreground, output captured (for bad-input checks); no group unless ``env``."""
    argv = [PYTHON, *train_module_args(args)]
    return run_cli(argv, cwd=cwd or REPO, env=clean_env(OMP_NUM_THREADS="1", **(env or {})), timeout=timeout)


# --- finding processes through /proc ---------------------------------------------------------------------------
_TRAIN_CMDLINES = (b"torchx_diloco.train", b"torchx_diloco._fleet.faulty\0train")


def proc_state(pid: int) -> Optional[str]:
    """The kernel's one-letter state of ``pid`` (R running, S sleeping, Z zombie...), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _environ(pid: str) -> Dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def train_workers(lighthouse_port: Optional[int] = None, **env: str) -> List[Dict[str, str]]:
    """Environments (plus ``PID``) of the live training workers whose environment holds every ``env`` item, and
    with ``lighthouse_port``, a TORCHFT_LIGHTHOUSE on that port.

    Workers are torchrun's children, told from torchrun itself by LOCAL_RANK, which torchrun sets on them only;
    whoever started torchrun (us, TorchX, Slurm) does not matter. Zombies are skipped: PID 1 in a container may
    reap orphans lazily, so a killed worker can linger as one. A process a worker forked (a subprocess between
    its fork and its exec carries the worker's command line and environment) is not a worker: it is dropped.
    """
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if not any(c in cmdline for c in _TRAIN_CMDLINES):
                continue
            e = _environ(pid)
        except OSError:
            continue
        if "LOCAL_RANK" not in e or any(e.get(k) != v for k, v in env.items()):
            continue
        if lighthouse_port is not None and not e.get("TORCHFT_LIGHTHOUSE", "").endswith(f":{lighthouse_port}"):
            continue
        if proc_state(int(pid)) not in (None, "Z"):
            found.append(dict(e, PID=pid))
    pids = {w["PID"] for w in found}
    return [w for w in found if str(parent_pid(int(w["PID"]))) not in pids]


def parent_pid(pid: int) -> Optional[int]:
    """``pid``'s parent, None if ``pid`` is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def pids_of_run(lighthouse_port: int) -> List[int]:
    """Every process of the run whose lighthouse listens on ``lighthouse_port``: the lighthouse, the groups'
    torchrun agents and workers (found through their environment), to leave nothing running after a test."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            lighthouse = _environ(pid).get("TORCHFT_LIGHTHOUSE", "")
        except OSError:
            continue
        if lighthouse.endswith(f":{lighthouse_port}") or (
            b"torchx_diloco.lighthouse" in cmdline and b"\0%d\0" % lighthouse_port in cmdline
        ):
            pids.append(int(pid))
    return pids


# --- what the groups recorded ----------------------------------------------------------------------------------
def metrics_url(checkpoint_dir: Union[str, Path], group: int) -> str:
    """Where group ``group`` writes its metrics JSON lines: beside the checkpoints (train.py)."""
    return f"{checkpoint_dir}/metrics/replica_group_{group}.jsonl"


def read_metrics(url: Union[str, Path]) -> List[Dict[str, Any]]:
    """The JSON lines at ``url`` (any fsspec URL); [] before the file exists. A line cut short (a SIGKILL
    mid-write, or read while being appended) comes back as ``{"torn_line": text}``, for the caller to count."""
    try:
        with fsspec.open(str(url), "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in filter(str.strip, lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"torn_line": line})
    return records


def committed(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The records of committed outer steps (a dropped round writes a record with ``committed: false``)."""
    return [r for r in records if r.get("committed")]


def committed_checksums(checkpoint_dir: Union[str, Path], group: int) -> Dict[int, str]:
    """outer step -> checksum of the global weights, as group ``group`` committed them."""
    return {r["outer_step"]: r["weights_sha"] for r in committed(read_metrics(metrics_url(checkpoint_dir, group)))}
