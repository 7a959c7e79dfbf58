"""`torchx run` for real: the diloco component on local_cwd, a lighthouse and two CPU groups under torchrun.

Logs are read where TorchX's local scheduler writes them: <log_dir>/torchx/<app_id>/<role>/0/{stdout,stderr}.log.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from torchx_diloco._fleet.testing import (
    BIN,
    REPO,
    Lighthouse,
    cli_env,
    committed,
    committed_checksums,
    free_port,
    kill_pid,
    metrics_url,
    pids_of_run,
    read_metrics,
    run_groups,
    train_workers,
)

OUTER = re.compile(r"DiLoCo: Number of outer optimizer steps completed: \[(\d+)\] loss = [\d.]+")
INNER = re.compile(r"DiLoCo: Number of inner optimizer steps completed: (\d+)")


def run_env() -> Dict[str, str]:
    return cli_env(PYTHONUNBUFFERED="1")


def role_log(log_dir: Path, role: str, stream: str = "stdout") -> Optional[Path]:
    found = sorted(log_dir.glob(f"torchx/*/{role}/0/{stream}.log"))
    return found[-1] if found else None


def read(path: Optional[Path]) -> str:
    return path.read_text(errors="replace") if path and path.exists() else ""


def outer_steps_done(log_dir: Path, group: int) -> int:
    """The last outer step the group's log says it committed (0 before the first)."""
    found = OUTER.findall(read(role_log(log_dir, f"replica_group_{group}")))
    return int(found[-1]) if found else 0


def train_worker_pid(group: int, port: int) -> int:
    """The training process (torchrun's worker, not the torchrun agent) of ``group`` in the run on ``port``."""
    for worker in train_workers(lighthouse_port=port, REPLICA_GROUP_ID=str(group)):
        return int(worker["PID"])
    raise AssertionError(f"no training process of group {group} found")


def lighthouse_port(log_dir: Path) -> int:
    """The port the run's lighthouse said it serves on (the component picks a free one per run), 0 if none."""
    found = re.search(r"serving on [\d.]+:(\d+)", read(role_log(log_dir, "lighthouse")))
    return int(found.group(1)) if found else 0


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


def start_nano_run(
    tmp_path: Path,
    port: Optional[int],
    outer: int,
    max_restarts: int,
    idle_exit: int,
    train_flags: List[str],
    sync_every: int = 40,
    extra: List[str] = (),
    log_dir_cfg: bool = True,
    ckpt: Optional[Path] = None,
) -> subprocess.Popen:
    """`torchx run` of diloco.diloco with the tiniest model; logs in tmp_path/logs (without ``log_dir_cfg``
    where the scheduler puts them by default), checkpoints in tmp_path/ckpt, the console in tmp_path/torchx.log.
    ``port`` None: the component's own choice (a free port per run). `torchx run` runs in a session of its own,
    as in a terminal: a signal to its process group reaches it, not the roles (TorchX starts them in theirs)."""
    cmd = [
        str(BIN / "torchx"),
        "run",
        "-s",
        "local_cwd",
        *(["-cfg", f"log_dir={tmp_path / 'logs'}"] if log_dir_cfg else []),
        "diloco.diloco",
        *(["--lighthouse_port", str(port)] if port else []),
        "--outer_steps",
        str(outer),
        "--sync_every",
        str(sync_every),
        "--model",
        "nano",
        "--max_restarts",
        str(max_restarts),
        "--lighthouse_idle_exit",
        str(idle_exit),
        "--checkpoint_dir",
        str(ckpt or tmp_path / "ckpt"),
        *extra,
        "--",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-batches",
        "0",
        *train_flags,
    ]
    with open(tmp_path / "torchx.log", "wb") as console:
        return subprocess.Popen(
            cmd, cwd=tmp_path, env=run_env(), stdout=console, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_make_run_in_a_fresh_clone(tmp_path):
    """What `make run` does, in a fresh clone: its `torchx run` command (the Makefile's RUN_ARGS; .torchxconfig
    picks the component and local_cwd), with this venv on PATH instead of installing a new one."""
    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    cfg = configparser.ConfigParser()
    cfg.read(clone / ".torchxconfig")
    dry = subprocess.run(["make", "-n", "run"], cwd=clone, capture_output=True, text=True, check=True).stdout
    command = shlex.split(next(line for line in dry.splitlines() if "torchx run" in line))
    assert command[1:3] == ["run", "diloco.diloco"], command
    args = dict(zip(command[3::2], command[4::2], strict=False))
    # the Makefile's command, 2 outer steps of H=20 instead of 6 of H=50: the same path, a minute less of the suite
    assert "--outer_steps" in args and "--sync_every" in args, command
    command[command.index("--outer_steps") + 1], command[command.index("--sync_every") + 1] = "2", "20"
    if "--lighthouse_idle_exit" in command:  # the lighthouse's wait after the last group finished: 2 s will do
        command[command.index("--lighthouse_idle_exit") + 1] = "2"
    groups, outer, sync = 2, 2, 20

    out = subprocess.run(
        [str(BIN / "torchx"), *command[1:]], cwd=clone, env=run_env(), capture_output=True, text=True, timeout=360
    )
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
    port, outer = free_port(), 5
    log_dir, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    # no durable checkpoint before the last step: the restarted worker starts from nothing and must
    # heal from group 0 (with one, it would resume from disk at the step the peer is at); --min_replicas 2:
    # group 0 waits for it (live, so the lighthouse does not see the run quiet) instead of racing to the end
    proc = start_nano_run(
        tmp_path,
        port,
        outer,
        max_restarts=2,
        idle_exit=3,
        train_flags=["--checkpoint-every", "1000"],
        extra=["--min_replicas", "2"],
    )
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
    assert "healed from a peer" in g1[died.end() :], g1[-4000:]
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


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_error_no_restart_can_fix_is_not_retried_and_the_app_fails_within_30s(tmp_path):
    """A missing data file (found in the group, not before launch): torchrun does not restart the worker 3 times,
    the lighthouse does not wait 10 minutes for groups that will never come, and `torchx run` ends with the line:
    its last line, and the failure of TorchX's status (reply files), without a traceback. Launched outside the
    repository with no log_dir: the logs stay, in torchx_logs/ of the launch directory."""
    missing = tmp_path / "no-such-corpus.txt"
    start = time.monotonic()
    proc = start_nano_run(
        tmp_path, None, outer=3, max_restarts=3, idle_exit=3, train_flags=["--data", str(missing)], log_dir_cfg=False
    )
    log_dir = tmp_path / "torchx_logs"
    try:
        rc = proc.wait(timeout=90)
    finally:
        stop(proc, lighthouse_port(log_dir))
    elapsed = time.monotonic() - start
    console = read(tmp_path / "torchx.log")
    fix = f"--data {str(missing)!r}: {missing} does not exist; pass an existing file, glob or fsspec URL"
    assert rc != 0 and "job finished: FAILED" in console, console[-4000:]
    assert f"torchx_diloco.train: error: {fix}" in console, console[-4000:]
    assert "stopped with an error no restart can fix" in console, console[-4000:]
    last, before = console.rstrip().splitlines()[-1], console.rstrip().splitlines()[-2]
    assert re.fullmatch(rf"torchx_diloco: error: replica_group_[01]: {re.escape(fix)}", last), console[-4000:]
    status = console[console.index("AppStatus:") :]  # the status TorchX prints (what `torchx status` shows)
    assert "msg: 'replica_group_" in status and "errorCode: 2" in status, status
    assert "Traceback" not in console and "SignalException" not in console, console[-4000:]
    assert "temporary log dir" not in console, console[-4000:]
    group_log = Path(before.split("'s log: ", 1)[1])  # the line before the last says where the log is
    assert group_log.is_relative_to(log_dir) and fix in read(group_log), before
    logs = "".join(read(role_log(log_dir, f"replica_group_{g}", "stderr")) for g in range(2))
    assert "will restart worker group" not in logs, logs[-4000:]  # torchrun retried nothing
    assert elapsed < 45, f"{elapsed:.0f}s: an app that cannot succeed must end about as fast as it starts"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_run_in_one_line_naming_how_to_resume_and_the_group_logs_are_quiet(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) mid-run: `torchx run` stops the app and ends with one line
    saying how to resume, no traceback and no group's last words; nothing of the run is left running. The
    groups' logs (kept, no log_dir given) hold no torchft INFO line and no HTTP access line of the heal at the
    first sync (torchft re-syncs every group from one at step 0). Before that, while the run trains, a second
    `torchx run` pointed at its --checkpoint_dir is refused before launch in one line and writes nothing there."""
    proc = start_nano_run(tmp_path, None, outer=200, max_restarts=0, idle_exit=3, train_flags=[], log_dir_cfg=False)
    log_dir = tmp_path / "torchx_logs"
    port = 0
    try:
        deadline = time.monotonic() + 180
        while not all(
            [int(k) for k in OUTER.findall(read(role_log(log_dir, f"replica_group_{g}")))][-1:] >= [2] for g in range(2)
        ):
            assert proc.poll() is None, read(tmp_path / "torchx.log")[-3000:]
            assert time.monotonic() < deadline, "the groups never committed 2 outer steps"
            time.sleep(0.5)
        port = lighthouse_port(log_dir)
        ckpt = tmp_path / "ckpt"
        holder = json.loads(read(ckpt / "LEASE.json"))["run"]  # the run's groups hold their folder
        intruder = tmp_path / "intruder"
        intruder.mkdir()
        third = start_nano_run(intruder, None, outer=3, max_restarts=0, idle_exit=3, train_flags=[], ckpt=ckpt)
        assert third.wait(timeout=120) != 0
        refusal = read(intruder / "torchx.log").strip().splitlines()[-1]
        assert f"{ckpt} is held by run 'diloco-" in refusal and "another --checkpoint-dir" in refusal, refusal
        assert not (intruder / "logs").exists()  # nothing was launched
        assert proc.poll() is None, "the run ended before the test stopped it: the refusal was not tested against it"
        assert json.loads(read(ckpt / "LEASE.json"))["run"] == holder
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while pids_of_run(port):
            assert time.monotonic() < deadline, f"processes of the run outlived torchx run: {pids_of_run(port)}"
            time.sleep(0.5)
    finally:
        stop(proc, port)
    console = read(tmp_path / "torchx.log")
    app_id = role_log(log_dir, "lighthouse").parts[-4]
    assert rc == 128 + signal.SIGINT, console[-3000:]
    resume = f"run {app_id} stopped (Ctrl-C); run the same command again to resume it from its checkpoints in "
    assert console.rstrip().splitlines()[-1] == f"torchx_diloco: {resume}{tmp_path / 'ckpt'}", console[-3000:]
    for unwanted in ("Traceback", "Connection reset", "ERROR", "SignalException"):
        assert unwanted not in console, console[-3000:]
    for g in range(2):
        text = read(role_log(log_dir, f"replica_group_{g}")) + read(role_log(log_dir, f"replica_group_{g}", "stderr"))
        assert "[INFO] [torchft" not in text and "INFO torchft" not in text, text[-3000:]
        assert '"GET /checkpoint/' not in text, text[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_default_runs_at_once_both_succeed_each_with_the_weights_it_has_alone(tmp_path):
    """Each run gets its own lighthouse port and run id: no group trains in the other run's quorum (which would
    average the two runs' pseudo-gradients), and a run's weights are those it has when it runs alone. (A run
    pointed at a folder another run holds: the Ctrl-C test, whose run is held open until the test stops it.)"""
    runs = {seed: tmp_path / f"seed{seed}" for seed in (0, 1)}
    flags = ["--min-replicas", "2", "--group-wait", "60"]  # both groups in every quorum: deterministic weights
    procs = {}
    for seed, folder in runs.items():
        folder.mkdir()
        procs[seed] = start_nano_run(
            folder, None, outer=3, max_restarts=0, idle_exit=3, sync_every=10, train_flags=[*flags, "--seed", str(seed)]
        )
    try:
        for seed, proc in procs.items():
            assert proc.wait(timeout=240) == 0, read(runs[seed] / "torchx.log")[-4000:]
    finally:
        for seed, proc in procs.items():
            stop(proc, lighthouse_port(runs[seed] / "logs"))
    ports = set()
    for folder in runs.values():
        ports.add(lighthouse_port(folder / "logs"))
        for g in range(2):
            records = committed(read_metrics(metrics_url(folder / "ckpt", g)))
            assert [r["outer_step"] for r in records] == [1, 2, 3]
            assert {r["participants"] for r in records} == {2}, records  # never 4: the runs did not mix
    assert len(ports) == 2

    alone = tmp_path / "alone"  # seed 1 again, by itself, by hand: the same weights at every step
    alone.mkdir()
    lighthouse = Lighthouse(alone, min_replicas=2)
    try:
        run_groups(
            2,
            lighthouse.url,
            [
                "--model",
                "nano",
                "--outer-steps",
                "3",
                "--sync-every",
                "10",
                "--seq-len",
                "32",
                "--batch-size",
                "4",
                "--eval-batches",
                "0",
                *flags,
                "--seed",
                "1",
                "--checkpoint-dir",
                str(alone / "ckpt"),
            ],
            alone,
        )
    finally:
        lighthouse.kill()
    assert committed_checksums(alone / "ckpt", 0) == committed_checksums(runs[1] / "ckpt", 0)
    assert committed_checksums(runs[0] / "ckpt", 0) != committed_checksums(runs[1] / "ckpt", 0)
