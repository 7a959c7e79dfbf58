"""`torchx run -s slurm` against a real Slurm (the single-host cluster of scripts/slurm-cluster.sh).

Everything here is real: sbatch/squeue/scancel, slurmd running the job steps on fake nodes, torchrun, the
torchft lighthouse and the training module. The nodes are one host, so every path is "shared storage".
Without Slurm these tests skip (CI sets TORCHX_DILOCO_REQUIRE_SLURM=1, which makes that a failure).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from torchx_diloco._fleet.testing import (
    REPO,
    cli_env,
    committed,
    committed_checksums,
    free_port,
    metrics_url,
    parent_pid,
    proc_state,
    read_metrics,
    run_cli,
    train_workers,
)

COMPONENT = f"{REPO}/components/diloco.py"
TRAIN = ["--model", "nano", "--sync_every", "40"]  # ~0.5 s per outer step here: long enough to act mid-run
# a survivor waits this long (not 60 s) for a dead group's checkpoint part or collective
SMALL = ["--", "--batch-size", "4", "--seq-len", "32", "--collective-timeout", "15"]
TERMINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def _slurm_problem() -> Optional[str]:
    if not shutil.which("sinfo"):
        return "no Slurm here (sinfo not found)"
    p = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True)
    if p.returncode != 0 or "up" not in p.stdout:
        return f"Slurm is not answering ({(p.stderr or p.stdout).strip()[:200]})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    problem = _slurm_problem()
    if problem:
        msg = f"{problem}: start the local test cluster with `sudo scripts/slurm-cluster.sh start`"
        if os.environ.get("TORCHX_DILOCO_REQUIRE_SLURM") == "1":
            pytest.fail(f"TORCHX_DILOCO_REQUIRE_SLURM=1 but {msg}", pytrace=False)
        pytest.skip(msg)


def needs_slurm(test):
    """Marks a test `slurm` and skips it (fails it under TORCHX_DILOCO_REQUIRE_SLURM=1) without a cluster."""
    return pytest.mark.slurm(pytest.mark.usefixtures("slurm_cluster")(test))


@pytest.fixture
def jobs():
    """Job ids a test submitted; whatever still runs is cancelled afterwards."""
    ids: List[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def env() -> Dict[str, str]:
    return cli_env(LOGLEVEL="INFO")


def torchx(args: List[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(["torchx", *args], cwd=cwd, env=env(), timeout=timeout)


def submit(args: List[str], cwd: Path, jobs: List[str], wait: bool = False, timeout: float = 120) -> str:
    """``torchx run -s slurm ...``: returns the app handle."""
    p = torchx(["run", "-s", "slurm", *(["--wait"] if wait else []), *args], cwd, timeout)
    handles = re.findall(r"^slurm://\S+$", p.stdout, re.M)
    if handles:
        jobs.append(handles[0].rsplit("/", 1)[1])
    assert p.returncode == 0 and handles, f"torchx run exited {p.returncode}:\n{p.stdout}\n{p.stderr[-3000:]}"
    return handles[0]


def job_id(handle: str) -> str:
    return handle.rsplit("/", 1)[1]


def state(jid: str) -> str:
    """JobState of a job (of a het job: its leader's) from ``scontrol show job``."""
    out = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith(f"JobId={jid} "):
            return re.search(r"JobState=(\S+)", line).group(1)
    return "UNKNOWN"


def wait_until(pred: Callable[[], object], timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_done(jid: str, timeout: float) -> str:
    s = wait_until(lambda: state(jid) in TERMINAL and state(jid), timeout, f"job {jid} to end")
    return s


def outer_steps(log: Path) -> List[int]:
    """Outer steps the training module printed, in order."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [int(k) for k in re.findall(r"Number of outer optimizer steps completed: \[(\d+)\]", text)]


def newest_complete(ckpt: Path) -> int:
    """Newest step whose global part is published (its manifest is written last), 0 if none."""
    return max((int(p.parent.name[5:]) for p in ckpt.glob("step_*/MANIFEST.global.json")), default=0)


def group_log(folder: Path, jid: str, group: int, stream: str = "out") -> Path:
    return folder / f"slurm-{jid}-replica_group_{group}-0.{stream}"


def need_nodes(n: int) -> None:
    """Skip (fail under TORCHX_DILOCO_REQUIRE_SLURM=1) with one line when the cluster has fewer than ``n`` nodes."""
    have = len(set(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()))
    if have < n:
        msg = f"needs {n} Slurm nodes, the cluster has {have}: `SLURM_NODES={n} scripts/slurm-cluster.sh start`"
        if os.environ.get("TORCHX_DILOCO_REQUIRE_SLURM") == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def parent_argv(pid: int) -> List[str]:
    """The command line of ``pid``'s parent (a training worker's: its torchrun agent)."""
    ppid = parent_pid(pid)
    return Path(f"/proc/{ppid}/cmdline").read_bytes().decode().split("\0")


# ------------------------------------------------------------------------------------------------- the tests


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_diloco_het_job_runs_heals_a_killed_worker_and_completes_with_status_and_logs(tmp_path, jobs):
    """One het job (lighthouse + 2 CPU groups); status/log while it runs and after, with another job queued; group
    1's worker SIGKILLed mid-run on its node is restarted by torchrun and heals (group 0 waits for it: min 2)."""
    run, job_dir = tmp_path / "run", tmp_path / "job"
    run.mkdir()
    # another job in the queue, named like a TorchX replica: squeue --json on 22.05 returns it for any -j
    other = subprocess.run(
        ["sbatch", "--parsable", "-J", "other-0", "-c", "1", f"--chdir={tmp_path}", "--wrap", "sleep 300"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    jobs.append(other)
    port = free_port()
    handle = submit(
        [
            "-cfg",
            f"job_dir={job_dir},time=10",
            COMPONENT + ":diloco",
            "--replica_groups",
            "2",
            "--min_replicas",
            "2",
            "--max_restarts",
            "2",
            "--outer_steps",
            "10",
            "--lighthouse_port",
            str(port),
            "--lighthouse_idle_exit",
            "4",
            "--checkpoint_dir",
            "ckpt",
            "--cpu",
            "1,2",  # groups that differ: each het component asks for its own group's resources
            "--memMB",
            "1024,2048",
            *TRAIN,
            *SMALL,
            "--sync-every",
            "40,20",  # and each group reads its own H
        ],
        run,
        jobs,
    )
    jid = job_id(handle)

    # while it runs: each group's component got its own resources, its worker its own threads
    shapes = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%j %C %m"], capture_output=True, text=True).stdout
    for name, cpus, mem in (("replica_group_0-0", 1, "1G"), ("replica_group_1-0", 2, "2G")):  # (1024, 2048 MB)
        assert re.search(rf"^{name} {cpus} {mem}$", shapes, re.M), shapes
    # the groups found the lighthouse through SLURM_JOB_NODELIST_HET_GROUP_0
    workers = wait_until(
        lambda: len(train_workers(SLURM_JOB_ID=jid)) == 2 and train_workers(SLURM_JOB_ID=jid),
        90,
        "both groups' training workers",
    )
    nodes = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%j %N"], capture_output=True, text=True).stdout
    lighthouse_node = re.search(r"^lighthouse-0 (\S+)$", nodes, re.M).group(1)
    assert {w["TORCHFT_LIGHTHOUSE"] for w in workers} == {f"http://{lighthouse_node}:{port}"}
    assert sorted((w["REPLICA_GROUP_ID"], w["OMP_NUM_THREADS"]) for w in workers) == [("0", "1"), ("1", "2")]
    assert all(w["SLURM_JOB_NODELIST_HET_GROUP_0"] == lighthouse_node for w in workers)

    status = torchx(["status", handle], run)
    assert status.returncode == 0, status.stderr
    assert re.search(r"State: RUNNING", status.stdout), status.stdout
    for role in ("lighthouse", "replica_group_0", "replica_group_1"):
        assert f"*{role}[0]:RUNNING" in status.stdout.replace(" ", ""), status.stdout
    assert "other" not in status.stdout  # not mixed with the other job

    wait_until(lambda: outer_steps(group_log(job_dir, jid, 0)), 120, "group 0's first outer step")
    victim = train_workers(SLURM_JOB_ID=jid, REPLICA_GROUP_ID="1")  # SLURM_JOB_ID: a het job's leader id
    assert len(victim) == 1, victim
    os.kill(int(victim[0]["PID"]), signal.SIGKILL)  # the worker dies on its node; torchrun stays
    restarted = wait_until(
        lambda: [w for w in train_workers(SLURM_JOB_ID=jid, REPLICA_GROUP_ID="1") if w["PID"] != victim[0]["PID"]],
        60,
        "torchrun to restart group 1's worker",
    )
    assert restarted[0]["TORCHELASTIC_RESTART_COUNT"] == "1"
    live = torchx(["log", f"{handle}/replica_group_0"], run)
    assert live.returncode == 0 and "Number of outer optimizer steps completed: [1]" in live.stdout, live.stderr

    assert wait_done(jid, 180) == "COMPLETED", (job_dir / f"slurm-{jid}.out").read_text()
    assert state(other) == "RUNNING"  # untouched
    status = torchx(["status", handle], run)
    assert "State: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    assert "other" not in status.stdout
    after = torchx(["log", handle], run)  # every role
    assert after.returncode == 0, after.stderr
    for g in (0, 1):
        assert f"replica_group_{g}/0 DiLoCo: group {g} finished at outer step 10" in after.stdout
    assert "lighthouse/0 lighthouse: groups seen: replica_group_0, replica_group_1" in after.stdout
    elsewhere = torchx(["log", f"{handle}/replica_group_1"], tmp_path)  # found through squeue's working dir
    assert "DiLoCo: group 1 finished at outer step 10" in elsewhere.stdout, elsewhere.stderr
    err = torchx(["log", "--streams", "stderr", f"{handle}/lighthouse"], run)
    assert err.returncode == 0, err.stderr
    records = read_metrics(metrics_url(job_dir / "ckpt", 1))
    # the restarted group rejoined the other (healed or resumed) instead of training alone
    assert records[-1]["outer_step"] == 10 and records[-1]["participants"] == 2, records[-3:]
    assert {r["window_steps"] for r in committed(records)} == {20}  # group 1's own H, its restart too

    listed = torchx(["list", "-s", "slurm"], run)  # no slurmdbd here: falls back to squeue
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"slurm://\S+/{jid}\s+lighthouse-0\s+SUCCEEDED", listed.stdout), listed.stdout
    assert not re.search(rf"slurm://\S+/{int(jid) + 1}\s", listed.stdout)  # het components are one app


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cancelled_job_resubmitted_resumes_from_newest_checkpoint(tmp_path, jobs):
    ckpt = tmp_path / "ckpt"
    args = ["--replica_groups", "2", "--lighthouse_idle_exit", "4", "--checkpoint_dir", str(ckpt), *TRAIN]
    first = submit(
        [COMPONENT + ":diloco", "--outer_steps", "500", "--lighthouse_port", str(free_port()), *args, *SMALL],
        tmp_path,
        jobs,
    )
    wait_until(lambda: newest_complete(ckpt) >= 2, 150, "a complete checkpoint at step >= 2")
    subprocess.run(["scancel", job_id(first)], check=True)  # the whole job is lost
    assert wait_done(job_id(first), 60) == "CANCELLED"
    # its groups released the folder, even one blocked in a quorum when SIGTERM came (KillWait is 5 s here; a
    # lease left behind is never deleted, and the resubmitted job would be refused while it is fresh)
    wait_until(lambda: not (ckpt / "LEASE.json").exists(), 30, "the cancelled job to release its lease")
    newest = newest_complete(ckpt)

    second = submit(
        [COMPONENT + ":diloco", "--outer_steps", str(newest + 2), "--lighthouse_port", str(free_port()), *args, *SMALL],
        tmp_path,
        jobs,
        wait=True,
        timeout=200,
    )
    assert state(job_id(second)) == "COMPLETED"
    for g in (0, 1):
        steps = outer_steps(group_log(tmp_path, job_id(second), g))
        assert steps == [newest + 1, newest + 2], (newest, steps)  # resumed from the newest, not from zero


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_separate_jobs_lighthouse_and_groups_cancelling_one_group_keeps_the_rest(tmp_path, jobs):
    port = free_port()
    lh = submit([COMPONENT + ":lighthouse", "--port", str(port), "--idle_exit", "5"], tmp_path, jobs)
    wait_until(lambda: state(job_id(lh)) == "RUNNING", 60, "the lighthouse job to start")
    node = subprocess.run(["squeue", "-h", "-j", job_id(lh), "-o", "%N"], capture_output=True, text=True).stdout.strip()
    url = f"http://{node}:{port}"
    ckpt = tmp_path / "ckpt"
    groups = [
        submit(
            [
                COMPONENT + ":replica_group",
                "--lighthouse_url",
                url,
                "--group",
                str(g),
                "--replica_groups",
                "2",
                "--outer_steps",
                "24",
                "--checkpoint_dir",
                str(ckpt),
                *TRAIN,
                *SMALL,
            ],
            tmp_path,
            jobs,
        )
        for g in (0, 1)
    ]
    logs = [tmp_path / f"slurm-{job_id(h)}-replica_group_{g}-0.out" for g, h in enumerate(groups)]

    def trained_together() -> bool:
        return any(r.get("participants") == 2 for r in read_metrics(metrics_url(ckpt, 1)))

    wait_until(trained_together, 150, "an outer step with both groups")
    subprocess.run(["scancel", job_id(groups[1])], check=True)
    assert wait_done(job_id(groups[1]), 60) == "CANCELLED"
    assert state(job_id(groups[0])) == "RUNNING" and state(job_id(lh)) == "RUNNING"

    assert wait_done(job_id(groups[0]), 180) == "COMPLETED", logs[0].read_text()[-2000:]
    assert "DiLoCo: group 0 finished at outer step 24" in logs[0].read_text()
    assert wait_done(job_id(lh), 60) == "COMPLETED"  # it exits once the groups went quiet


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_hugging_face_model_trains_on_slurm_with_identical_weights_in_both_groups(tmp_path, jobs):
    """A transformers Llama built from a config (no download), its JSON args through sbatch, srun and torchrun."""
    ckpt = tmp_path / "ckpt"
    model_args = json.dumps({"arch": "llama", "hidden_size": 32})
    component = f"--replica_groups 2 --outer_steps 2 --sync_every 5 --min_replicas 2 --checkpoint_dir {ckpt}"
    component += " --lighthouse_idle_exit 3"  # not the default 30 s after the last group finished
    train = "--batch-size 4 --seq-len 32 --eval-batches 0 --model torchx_diloco.hf:causal_lm --model-args"
    handle = submit([COMPONENT + ":diloco", *component.split(), "--", *train.split(), model_args], tmp_path, jobs)
    jid = job_id(handle)
    assert wait_done(jid, 180) == "COMPLETED", group_log(tmp_path, jid, 0, "err").read_text()[-3000:]
    sums = [
        {r["outer_step"]: r["weights_sha"] for r in read_metrics(metrics_url(ckpt, g)) if r["committed"]}
        for g in (0, 1)
    ]
    assert list(sums[0]) == [1, 2] and sums[0] == sums[1], sums


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_error_no_restart_can_fix_ends_the_job_failed_within_seconds(tmp_path, jobs):
    """A missing data file, found by the groups on their nodes: torchrun retries nothing, the job ends FAILED
    (the lighthouse hears of it too) instead of restarting 3 times and waiting out the lighthouse's timeout."""
    missing = tmp_path / "no-such-corpus.txt"
    start = time.monotonic()
    handle = submit(
        [
            COMPONENT + ":diloco",
            "--replica_groups",
            "2",
            "--outer_steps",
            "3",
            "--max_restarts",
            "3",
            *TRAIN,
            *SMALL,
            "--data",
            str(missing),
        ],
        tmp_path,
        jobs,
    )
    jid = job_id(handle)
    assert wait_done(jid, 120) == "FAILED"
    elapsed = time.monotonic() - start
    errors = "".join(group_log(tmp_path, jid, g, "err").read_text(errors="replace") for g in (0, 1))
    assert f"torchx_diloco.train: error: --data {str(missing)!r}: {missing} does not exist" in errors, errors[-3000:]
    assert "will restart worker group" not in errors, errors[-3000:]
    assert elapsed < 60, f"{elapsed:.0f}s from submission to FAILED"
    status = torchx(["status", handle], tmp_path)
    assert "State: FAILED" in status.stdout, status.stdout + status.stderr


@needs_slurm
@pytest.mark.parametrize(
    "bad, expected",
    [
        (["-cfg", "partition=no_such_partition"], "Invalid partition name specified"),
        (["--gpus_per_group", "64"], "Invalid generic resource (gres) specification"),
    ],
)
def test_sbatch_refusal_is_one_clear_line(tmp_path, jobs, bad, expected):
    cfg, comp = (bad, []) if bad[0] == "-cfg" else ([], bad)
    p = torchx(["run", "-s", "slurm", *cfg, COMPONENT + ":diloco", *comp, "--outer_steps", "1"], tmp_path)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if expected in ln]
    assert len(lines) == 1 and "sbatch refused the job" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not re.search(r"^slurm://", p.stdout, re.M)


@needs_slurm
def test_status_and_list_read_real_squeue_json_of_pending_het_and_unknown_jobs(tmp_path, jobs):
    """The 22.05 shapes, from the real squeue: a pending het job (no job_resources), other jobs, unknown ids."""
    from torchx.specs import AppState

    from torchx_diloco.slurm import SlurmScheduler

    script = tmp_path / "het.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --job-name=trainer-0\n#SBATCH hetjob\n#SBATCH --job-name=trainer-1\nsrun true : true\n"
    )
    held = subprocess.run(
        ["sbatch", "--parsable", "--hold", f"--chdir={tmp_path}", str(script)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    jobs.append(held)
    plain = subprocess.run(
        ["sbatch", "--parsable", "-J", "plain-0", f"--chdir={tmp_path}", "--wrap", "sleep 60"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    jobs.append(plain)
    raw = json.loads(subprocess.run(["squeue", "--json"], capture_output=True, text=True, check=True).stdout)
    pending = [j for j in raw["jobs"] if str(j["job_id"]) == held]
    assert pending and "job_resources" not in pending[0]  # the 22.05 shape this plugin copes with

    sched = SlurmScheduler("test")
    desc = sched.describe(held)
    assert desc.state == AppState.PENDING
    assert [(r.role, [x.id for x in r.replicas]) for r in desc.roles_statuses] == [("trainer", [0, 1])]
    plain_desc = wait_until(
        lambda: (d := sched.describe(plain)) and d.state == AppState.RUNNING and d, 30, "the plain job to run"
    )
    assert [r.role for r in plain_desc.roles_statuses] == ["plain"]
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True).stdout
    assert plain_desc.roles_statuses[0].replicas[0].hostname in nodes.split()  # any cluster's node names
    assert sched.describe("999999") is None  # squeue answers with every job for an unknown id on 22.05
    listed = {a.app_id: a.state for a in sched.list()}
    assert listed[held] == AppState.PENDING and str(int(held) + 1) not in listed  # one entry per het job


def test_slurm_plugin_replaces_builtin_and_local_cwd_stays_default(tmp_path):
    """Registration through the `torchx.schedulers` entry points (no Slurm needed)."""
    from torchx.schedulers import get_default_scheduler_name, get_scheduler_factories

    from torchx_diloco.slurm import SlurmScheduler

    assert isinstance(get_scheduler_factories()["slurm"]("test"), SlurmScheduler)
    assert get_default_scheduler_name() == "local_cwd"
    # the CLI too, from a folder without a .torchxconfig
    p = torchx(["run", "--dryrun", "utils.echo", "--msg", "hi"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "local_cwd://" in p.stdout and "sbatch" not in p.stdout, p.stdout


def test_newer_squeue_shapes_are_read_too():
    """Shapes Slurm 23.02+ prints (het_job_id as a dict, job_state as a list, job_resources None while pending):
    hand-written from the slurm REST schema, since the cluster here is 22.05 (its shapes are tested above)."""
    from torchx.specs import AppState

    from torchx_diloco.slurm import describe_from_squeue_json, list_from_squeue_json

    def job(jid, offset, name, st, resources):
        return {
            "job_id": jid,
            "het_job_id": {"set": True, "infinite": False, "number": 40},
            "het_job_offset": offset,
            "name": name,
            "job_state": [st],
            "job_resources": resources,
            "nodes": "n2" if resources is None else "",
            "command": "x.sh",
            "current_working_directory": "/w",
        }

    out = {
        "jobs": [
            job(
                40,
                0,
                "lighthouse-0",
                "RUNNING",
                {
                    "nodes": {
                        "list": "n1",
                        "allocation": [{"name": "n1", "cpus": {"used": 1}, "memory": {"allocated": 1024}}],
                    }
                },
            ),
            job(41, 1, "replica_group_0-0", "PENDING", None),
            {"job_id": 7, "het_job_id": {"set": False, "number": 0}, "name": "other-0", "job_state": ["RUNNING"]},
        ]
    }
    desc = describe_from_squeue_json(out, "40")
    assert desc.state == AppState.RUNNING
    assert [(r.role, r.replicas[0].state, r.replicas[0].hostname) for r in desc.roles_statuses] == [
        ("lighthouse", AppState.RUNNING, "n1"),
        ("replica_group_0", AppState.PENDING, "n2"),
    ]
    assert [(a.app_id, a.name) for a in list_from_squeue_json(out)] == [("40", "lighthouse-0"), ("7", "other-0")]
    assert describe_from_squeue_json(out, "41").roles_statuses[0].role == "replica_group_0"  # a component's id


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_groups_of_two_nodes_heal_a_killed_rank_and_end_with_identical_weights(tmp_path, jobs):
    """2 groups x 2 nodes (5 het components): each group is one `torchrun --nnodes 2` rendezvousing on its first
    node at a port of its own job; a rank of group 1's second node is SIGKILLed mid-run, torchrun restarts the
    group, it heals from group 0 and the job still ends SUCCEEDED with both groups' weights identical."""
    need_nodes(5)
    ckpt, steps = tmp_path / "ckpt", 14
    handle = submit(
        [
            COMPONENT + ":diloco",
            "--replica_groups",
            "2",
            "--nodes_per_group",
            "2",
            "--min_replicas",
            "2",  # group 0 waits for the restarted group instead of finishing alone
            "--outer_steps",
            str(steps),
            "--max_restarts",
            "2",
            "--lighthouse_port",
            str(free_port()),
            "--lighthouse_idle_exit",
            "4",  # group 0 stays live while group 1 restarts (min_replicas 2): only the end is quiet
            "--checkpoint_dir",
            str(ckpt),
            "--model",
            "nano",
            "--sync_every",
            "20",
            *SMALL,
        ],
        tmp_path,
        jobs,
    )
    jid = job_id(handle)
    workers = wait_until(lambda: len(w := train_workers(SLURM_JOB_ID=jid)) == 4 and w, 90, "4 training workers")
    assert sorted((w["REPLICA_GROUP_ID"], w["RANK"], w["WORLD_SIZE"]) for w in workers) == [
        ("0", "0", "2"),
        ("0", "1", "2"),
        ("1", "0", "2"),
        ("1", "1", "2"),
    ]
    assert len({w["SLURMD_NODENAME"] for w in workers}) == 4  # one node each
    for w in workers:  # the agent's rendezvous: the group's first node, a port from that component's job id
        g = int(w["REPLICA_GROUP_ID"])
        agent = parent_argv(int(w["PID"]))
        first = w[f"SLURM_JOB_NODELIST_HET_GROUP_{1 + 2 * g}"]
        port = 20000 + int(w[f"SLURM_JOB_ID_HET_GROUP_{1 + 2 * g}"]) % 12000
        assert agent[agent.index("--rdzv_endpoint") + 1] == f"{first}:{port}", agent
    status = torchx(["status", handle], tmp_path)
    assert status.returncode == 0 and "State: RUNNING" in status.stdout, status.stdout + status.stderr
    for role in ("replica_group_0[0]", "replica_group_0[1]", "replica_group_1[0]", "replica_group_1[1]"):
        assert re.search(rf"^ *\*?{re.escape(role)}:RUNNING *$", status.stdout, re.M), status.stdout  # * marks [0]

    wait_until(lambda: len(committed_checksums(ckpt, 1)) >= 3, 120, "group 1 past outer step 3")
    # the victim is group 1's rank-1 worker as first seen (its node's worker, not a later listing: a listing under
    # load once held no single worker there for as long as the run lasted); it must still be that live process
    victim = next(w for w in workers if (w["REPLICA_GROUP_ID"], w["RANK"]) == ("1", "1"))
    assert proc_state(int(victim["PID"])) not in (None, "Z"), (victim["PID"], train_workers(SLURM_JOB_ID=jid))
    killed_at = max(committed_checksums(ckpt, 1))
    os.kill(int(victim["PID"]), signal.SIGKILL)  # the worker dies on its node; torchrun stays
    node = victim["SLURMD_NODENAME"]
    restarted = wait_until(  # on the same node (after a restart torchrun may hand the node another rank)
        lambda: [
            w
            for w in train_workers(SLURM_JOB_ID=jid, SLURMD_NODENAME=node)
            if w["PID"] != victim["PID"] and w["TORCHELASTIC_RESTART_COUNT"] == "1"
        ],
        90,
        f"torchrun on {node} to restart the killed rank",
    )
    assert restarted[0]["REPLICA_GROUP_ID"] == "1"

    final = wait_done(jid, 200)
    errors = "".join((tmp_path / f"slurm-{jid}-replica_group_1-{k}.err").read_text()[-2000:] for k in (0, 1))
    assert final == "COMPLETED", errors
    status = torchx(["status", handle], tmp_path)
    assert "State: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    logs = torchx(["log", handle], tmp_path)  # every role, every node
    assert logs.returncode == 0, logs.stderr
    for g in (0, 1):
        done = rf"^replica_group_{g}/[01] DiLoCo: group {g} finished at outer step {steps}$"
        assert re.search(done, logs.stdout, re.M), logs.stdout[-3000:]
    sums = [committed_checksums(ckpt, g) for g in (0, 1)]
    assert max(sums[0]) == max(sums[1]) == steps and sums[0][steps] == sums[1][steps], sums
    assert all(sums[0][s] == sums[1][s] for s in set(sums[0]) & set(sums[1])), sums
    after = [r for r in read_metrics(metrics_url(ckpt, 1)) if r.get("committed") and r["outer_step"] > killed_at]
    assert after and after[-1]["participants"] == 2, after[-3:]  # the restarted group trained on with group 0
