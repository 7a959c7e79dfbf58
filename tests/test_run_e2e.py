"""`torchx run` for real: the diloco component on local_cwd, a lighthouse and two CPU groups under torchrun.

Logs are read where TorchX's local scheduler writes them: <log_dir>/torchx/<app_id>/<role>/0/{stdout,stderr}.log.
"""

from __future__ import annotations

import configparser
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from torchx_diloco.testing import BIN, REPO, cli_env, free_port, kill_pid, pids_of_run, train_workers

OUTER = re.compile(r"DiLoCo: Number of outer optimizer steps completed: \[(\d+)\] loss = [\d.]+")
INNER = re.compile(r"DiLoCo: Number of inner optimizer steps completed: (\d+)")


def run_env() -> Dict[str, str]:
    return cli_env(PYTHONUNBUFFERED="1")


def role_log(log_dir: Path, role: str, stream: str = "stdout") -> Optional[Path]:
    found = sorted(log_dir.glob(f"torchx/*/{role}/0/{stream}.log"))
    return found[-1] if found else None


def read(path: Optional[Path]) -> str:
    return path.read_text(errors="replace") if path and path.exists() else ""


def train_worker_pid(group: int, port: int) -> int:
    """The training process (torchrun's worker, not the torchrun agent) of ``group`` in the run on ``port``."""
    for worker in train_workers(lighthouse_port=port, REPLICA_GROUP_ID=str(group)):
        return int(worker["PID"])
    raise AssertionError(f"no training process of group {group} found")


def stop(proc: subprocess.Popen, port: int) -> None:
    """Leave nothing running: the torchx CLI, then any role process of this run still alive."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # torchx run cancels the app on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in pids_of_run(port):
        kill_pid(pid)


def assert_complete_checkpoint(ckpt: Path, step: int) -> None:
    folder = ckpt / f"step_{step:08d}"
    assert (folder / "MANIFEST.global.json").is_file(), sorted(p.name for p in ckpt.glob("*"))
    assert (folder / "global.pt").is_file()


def start_nano_run(tmp_path: Path, port: int, outer: int, max_restarts: int, idle_exit: int,
                   train_flags: List[str]) -> subprocess.Popen:
    """`torchx run` of diloco.diloco with the tiniest model; logs in tmp_path/logs, checkpoints in tmp_path/ckpt."""
    cmd = [str(BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}", "diloco.diloco",
           "--lighthouse_port", str(port), "--outer_steps", str(outer), "--sync_every", "40", "--model", "nano",
           "--max_restarts", str(max_restarts), "--lighthouse_idle_exit", str(idle_exit),
           "--checkpoint_dir", str(tmp_path / "ckpt"),
           "--", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "0", *train_flags]
    with open(tmp_path / "torchx.log", "wb") as console:
        return subprocess.Popen(cmd, cwd=tmp_path, env=run_env(), stdout=console, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bare_torchx_run_in_a_fresh_clone(tmp_path):
    """What `make run` does: `torchx run`, no arguments, in the repo root (.torchxconfig picks everything)."""
    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    cfg = configparser.ConfigParser()
    cfg.read(clone / ".torchxconfig")
    section = cfg["component:diloco.diloco"]
    groups, outer, sync = int(section["replica_groups"]), int(section["outer_steps"]), int(section["sync_every"])

    out = subprocess.run([str(BIN / "torchx"), "run"], cwd=clone, env=run_env(), capture_output=True, text=True,
                         timeout=360)
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    assert "SUCCEEDED" in out.stderr, tail

    log_dir = clone / cfg["local_cwd"]["log_dir"]
    assert "all 2 groups finished" in read(role_log(log_dir, "lighthouse"))
    for g in range(groups):
        text = read(role_log(log_dir, f"replica_group_{g}"))
        assert [int(k) for k in OUTER.findall(text)] == list(range(1, outer + 1)), text[-3000:]
        assert [int(n) for n in INNER.findall(text)] == [sync * k for k in range(1, outer + 1)], text[-3000:]
        assert f"DiLoCo: group {g} finished at outer step {outer}" in text
    assert_complete_checkpoint(clone / "checkpoints" / "diloco", outer)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_worker_is_restarted_by_torchrun_heals_and_the_app_succeeds(tmp_path):
    port, outer = free_port(), 15
    log_dir, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    # no durable checkpoint before the last step: the restarted worker starts from nothing and must
    # heal from group 0 (with one, it would resume from disk at the step the peer is at)
    proc = start_nano_run(tmp_path, port, outer, max_restarts=2, idle_exit=15,
                          train_flags=["--checkpoint-every", "1000"])
    try:
        deadline = time.monotonic() + 180
        while not re.search(r"outer optimizer steps completed: \[2\]", read(role_log(log_dir, "replica_group_1"))):
            assert proc.poll() is None, read(tmp_path / "torchx.log")[-3000:]
            assert time.monotonic() < deadline, "group 1 did not reach outer step 2"
            time.sleep(0.2)
        victim = train_worker_pid(1, port)
        os.kill(victim, signal.SIGKILL)

        rc = proc.wait(timeout=300)
        console_text = read(tmp_path / "torchx.log")
        assert rc == 0, console_text[-4000:]
        assert "SUCCEEDED" in console_text
    finally:
        stop(proc, port)

    g1 = read(role_log(log_dir, "replica_group_1")) + read(role_log(log_dir, "replica_group_1", "stderr"))
    # torchrun's agent saw the worker die and started a new one, which rejoined with the peer's weights
    died = re.search(rf"failed \(exitcode: -9\) local_rank: 0 \(pid: {victim}\)", g1)
    assert died, g1[-4000:]
    assert "healed from a peer" in g1[died.end():], g1[-4000:]
    for g in range(2):
        text = read(role_log(log_dir, f"replica_group_{g}"))
        assert f"DiLoCo: group {g} finished at outer step {outer}" in text, text[-3000:]
    assert_complete_checkpoint(ckpt, outer)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_group_out_of_restarts_fails_the_app_while_its_peer_trains_to_the_end(tmp_path):
    """`--max_restarts 0`: a killed worker is not restarted, so `torchx run` ends FAILED, non-zero; the other
    group is not taken down with it (DiLoCo goes on with the groups it has) and finishes the run."""
    port, outer = free_port(), 6
    log_dir = tmp_path / "logs"
    proc = start_nano_run(tmp_path, port, outer, max_restarts=0, idle_exit=3, train_flags=["--group-wait", "0"])
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, read(tmp_path / "torchx.log")[-3000:]
            assert time.monotonic() < deadline, "group 1's training process never started"
            try:
                victim = train_worker_pid(1, port)
                break
            except AssertionError:
                time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        rc = proc.wait(timeout=200)
    finally:
        stop(proc, port)

    console_text = read(tmp_path / "torchx.log")
    assert rc != 0, console_text[-4000:]  # a restarted worker would have trained to the end: rc 0
    assert "job finished: FAILED" in console_text, console_text[-4000:]
    g1 = read(role_log(log_dir, "replica_group_1", "stderr"))
    assert re.search(rf"exitcode\s*: -9 \(pid: {victim}\)", g1), g1[-4000:]
    g0 = read(role_log(log_dir, "replica_group_0"))
    assert f"DiLoCo: group 0 finished at outer step {outer}" in g0, g0[-3000:]
