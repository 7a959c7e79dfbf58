"""Real processes for the tests: a lighthouse and replica groups running ``python -m torchx_diloco.train``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_env(group: int, groups: int, lighthouse: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        REPLICA_GROUP_ID=str(group),
        NUM_REPLICA_GROUPS=str(groups),
        TORCHFT_LIGHTHOUSE=lighthouse,
        OMP_NUM_THREADS="1",  # groups share the machine's cores
        PYTHONUNBUFFERED="1",
    )
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    env.update(extra or {})
    return env


class Lighthouse:
    """``python -m torchx_diloco.lighthouse`` on a free loopback port."""

    def __init__(self, log_dir: Path, min_replicas: int = 1, idle_exit: float = 3.0,
                 port: Optional[int] = None, extra: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.url = f"http://localhost:{self.port}"
        self.log = Path(log_dir) / f"lighthouse-{self.port}.log"
        self.args = [PYTHON, "-m", "torchx_diloco.lighthouse", "--port", str(self.port), "--min-replicas",
                     str(min_replicas), "--idle-exit", str(idle_exit), "--join-timeout-ms", "2000", *extra]
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/status", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"lighthouse exited: {self.log.read_text()}")
                time.sleep(0.1)
        raise RuntimeError("lighthouse did not answer in 30 s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text()


class Group:
    """One replica group as a separate process."""

    def __init__(self, group: int, groups: int, lighthouse: str, args: Sequence[str], log_dir: Path,
                 extra_env: Optional[Dict[str, str]] = None, tag: str = "") -> None:
        self.group = group
        self.log = Path(log_dir) / f"group{group}{tag}.log"
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "torchx_diloco.train", *args],
            env=group_env(group, groups, lighthouse, extra_env),
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            cwd=log_dir,
            start_new_session=True,
        )

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"group {self.group} did not finish in {timeout}s:\n{self.output()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run_groups(groups: int, lighthouse: str, args: Sequence[str], log_dir: Path, timeout: float = 240) -> List[Group]:
    """Start ``groups`` groups, wait for all; assert each exited 0."""
    procs = [Group(g, groups, lighthouse, args, log_dir) for g in range(groups)]
    for p in procs:
        rc = p.wait(timeout)
        assert rc == 0, f"group {p.group} exited {rc}:\n{p.output()[-3000:]}"
    return procs


def train_once(args: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 120,
               cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run the training module in the foreground (for bad-input checks)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("REPLICA_GROUP_ID", "NUM_REPLICA_GROUPS", "TORCHFT_LIGHTHOUSE"):
        full_env.pop(k, None)
    full_env.update(env or {})
    return subprocess.run([PYTHON, "-m", "torchx_diloco.train", *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or REPO)
