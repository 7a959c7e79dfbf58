"""Whole-run loss: kill -9 everything, start again, and end where an uninterrupted run ends."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import hold_at, printed_step, wait_until
from tests.test_groups import SMALL
from torchx_diloco._fleet.faulty import FAULTS_ENV
from torchx_diloco._fleet.testing import (
    Group,
    Lighthouse,
    committed,
    committed_checksums,
    metrics_url,
    read_metrics,
    run_groups,
)
from torchx_diloco.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow

ARGS = [*SMALL, "--outer-steps", "6", "--sync-every", "10", "--min-replicas", "2"]
# Streaming: every fragment sync is an outer step, the local weights differ from the global ones after it
STREAMING = ["--fragments", "2", "--overlap-steps", "1", "--mix-alpha", "0.5", "--codec", "int8"]
OWN_H = ["--sync-every", "10,4"]  # groups that differ: group 1 takes 4 inner steps per outer step, weighted by them


@pytest.mark.parametrize("extra", [OWN_H, STREAMING], ids=["blocking-own-h", "streaming-int8"])
def test_kill_9_of_whole_run_resumes_from_last_checkpoint_and_matches_uninterrupted(tmp_path, faulty_url, extra):
    args = [*ARGS, *extra]
    reference = tmp_path / "uninterrupted"
    lighthouse = Lighthouse(tmp_path, min_replicas=2)
    run_groups(2, lighthouse.url, [*args, "--checkpoint-dir", str(reference)], tmp_path)
    lighthouse.kill()

    # killed once both committed step 4, whose checkpoint they are held from writing (hold_at): step 3 is the
    # newest on disk, and neither group can be further along, however fast it trains
    ckpt, release = faulty_url, tmp_path / "release"
    lighthouse = Lighthouse(tmp_path, min_replicas=2)
    held = hold_at(4, release)
    groups = [
        Group(g, 2, lighthouse.url, [*args, "--checkpoint-dir", ckpt], tmp_path, extra_env=held, tag="-first")
        for g in range(2)
    ]
    try:
        for g in groups:
            wait_until(f"outer step 4 of group {g.group}", printed_step(g, 4), groups)
    finally:
        for g in groups:
            g.kill()  # SIGKILL, no chance to flush anything
        lighthouse.kill()
    killed_at = CheckpointStore(ckpt).latest(0).step
    assert killed_at == 3

    lighthouse = Lighthouse(tmp_path, min_replicas=2)
    resumed = run_groups(2, lighthouse.url, [*args, "--checkpoint-dir", ckpt], tmp_path)
    lighthouse.kill()
    for g in resumed:
        out = g.output().split("resumed from")[-1]
        assert f"[{killed_at + 1}] loss" in out
        assert f"[{killed_at}] loss" not in out, "nothing before the checkpoint is trained again"
    reference_sums = committed_checksums(reference, 0)
    resumed_sums = committed_checksums(ckpt, 0)
    # every step after the resume, not only the last: the local weights, momentum and data all came back
    assert [resumed_sums[s] for s in range(killed_at + 1, 7)] == [reference_sums[s] for s in range(killed_at + 1, 7)]
    assert committed_checksums(ckpt, 1)[6] == reference_sums[6]
    if extra == STREAMING:
        fragments = [r["fragment"] for r in committed(read_metrics(metrics_url(reference, 0)))]
        assert fragments == [0, 1, 0, 1, 0, 1]  # outer step s syncs fragment (s - 1) % P
    else:  # each group took its own H in every outer step, the resumed run too
        for g, h in enumerate((10, 4)):
            assert {r["window_steps"] for r in committed(read_metrics(metrics_url(ckpt, g)))} == {h}


def test_crash_in_the_middle_of_a_checkpoint_write_leaves_previous_step_loadable(tmp_path, faulty_url):
    """The process dies (os._exit) half way through writing step 3's global part, on a real filesystem."""
    url = faulty_url
    args = [*SMALL, "--outer-steps", "4", "--sync-every", "5", "--checkpoint-dir", url]
    # serves both runs; the crashed run's heartbeats count (and hold the next quorum) until this timeout
    lighthouse = Lighthouse(tmp_path, idle_exit=0, extra=["--heartbeat-timeout-ms", "1500"])
    crash = {FAULTS_ENV: json.dumps([{"match": "step_00000003/global.pt", "action": "crash"}])}
    g = Group(0, 1, lighthouse.url, args, tmp_path, extra_env=crash)
    assert g.wait() == 137
    store = CheckpointStore(url)
    assert store.steps()[-1] == 3, "step 3 was being written"
    assert store.latest(0).step == 2

    resumed = Group(0, 1, lighthouse.url, args, tmp_path, tag="-resumed")
    assert resumed.wait() == 0, resumed.output()[-2000:]
    lighthouse.kill()
    out = resumed.output()
    assert "[3] loss" in out and "[4] loss" in out and "[2] loss" not in out
    assert CheckpointStore(url).latest(0).step == 4


@pytest.fixture(params=["local", "s3"])
def folder_url(request, tmp_path):
    return str(tmp_path / "ckpt") if request.param == "local" else request.getfixturevalue("s3_url")


def test_a_killed_runs_folder_is_resumed_by_a_new_run_without_a_flag(tmp_path, folder_url):
    """A run SIGKILLed mid-training leaves its lease behind; a new run (another lighthouse: another run) on the same
    folder, here on a local disk or the moto S3 server, takes it without a flag (its holder's process is gone from
    this host), resumes from the newest checkpoint, and releases the folder when it ends."""
    from torchx_diloco.lease import Lease

    args = [*SMALL, "--sync-every", "5", "--checkpoint-dir", folder_url]
    first_lighthouse = Lighthouse(tmp_path, idle_exit=0)
    first = Group(0, 1, first_lighthouse.url, [*args, "--outer-steps", "1000"], tmp_path)
    store, deadline = CheckpointStore(folder_url), time.monotonic() + 120
    while store.newest_published_step() < 2:
        assert time.monotonic() < deadline and first.proc.poll() is None, first.output()[-2000:]
        time.sleep(0.1)
    first.kill()
    first_lighthouse.kill()
    newest = store.latest(0).step
    held = Lease(folder_url, "?", 60).holder()
    assert held is not None and held.run == f"lighthouse {first_lighthouse.url}" and held.died_here()
    lighthouse = Lighthouse(tmp_path, idle_exit=0)  # another run
    second = Group(0, 1, lighthouse.url, [*args, "--outer-steps", str(newest + 1)], tmp_path, tag="-second")
    assert second.wait() == 0, second.output()[-2000:]
    lighthouse.kill()
    assert f"[{newest + 1}] loss" in second.output() and f"(outer step {newest})" in second.output()
    latest = store.latest(0)
    assert latest.step == newest + 1 and latest.group_state["inner_steps"] == 5 * (newest + 1)
    steps = [r["outer_step"] for r in read_metrics(metrics_url(folder_url, 0))]
    # the killed run's lines (its last one may be lost with the kill), then the new run's one outer step
    assert steps[-1] == newest + 1 and steps[:-1] == list(range(1, len(steps))) and len(steps) >= newest, steps
    assert Lease(folder_url, "?", 60).holder() is None, "the second run ended: the folder is free"


@pytest.mark.parametrize("action, text", [("error", "Input/output error"), ("full", "No space left on device")])
def test_storage_fault_during_training_is_logged_once_and_training_goes_on(tmp_path, faulty_url, action, text):
    """A checkpoint filesystem that fails mid-write at step 2: steps 1 and 3 are saved, the run finishes."""
    url = faulty_url
    lighthouse = Lighthouse(tmp_path)
    fault = {FAULTS_ENV: json.dumps([{"match": "step_00000002/", "action": action}])}
    g = Group(
        0,
        1,
        lighthouse.url,
        [*SMALL, "--outer-steps", "3", "--sync-every", "5", "--checkpoint-dir", url],
        tmp_path,
        extra_env=fault,
    )
    assert g.wait() == 0, g.output()[-2000:]
    lighthouse.kill()
    out = g.output()
    assert out.count(text) == 1, out[-3000:]
    assert "checkpoint of outer step 2 failed (training goes on, the previous checkpoint stays)" in out
    assert "[3] loss" in out
    store = CheckpointStore(url)
    assert store.latest(0).step == 3
    assert not store.has_part(2, "global")
    records = {r["outer_step"]: r for r in committed(read_metrics(metrics_url(tmp_path / "ckpt", 0)))}
    assert "checkpoint" not in records[2] and "checkpoint" in records[3]
