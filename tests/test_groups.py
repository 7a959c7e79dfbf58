"""Replica groups as separate processes around a real lighthouse: agreement, equivalence, healing, resume."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from torchx_diloco._fleet.testing import Group, Lighthouse, committed, committed_checksums, read_metrics, run_groups
from torchx_diloco.checkpoint import GLOBAL_PART, CheckpointStore

pytestmark = pytest.mark.slow

SMALL = ["--model", "nano", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--group-wait", "20"]


def final_weights(ckpt_url: str) -> dict:
    store = CheckpointStore(ckpt_url)
    return store.read_part(store.steps()[-1], GLOBAL_PART)["diloco"]["global_weights"]


@pytest.mark.parametrize("groups", [2, 3])
def test_groups_end_every_outer_step_with_identical_weights(tmp_path, groups):
    lighthouse = Lighthouse(tmp_path, min_replicas=groups)
    ckpt = tmp_path / "ckpt"
    procs = run_groups(
        groups,
        lighthouse.url,
        [
            *SMALL,
            "--outer-steps",
            "3",
            "--sync-every",
            "4",
            "--min-replicas",
            str(groups),
            "--checkpoint-dir",
            str(ckpt),
        ],
        tmp_path,
    )
    lighthouse.kill()
    sums = [committed_checksums(ckpt, g) for g in range(groups)]
    assert list(sums[0]) == [1, 2, 3]
    assert all(s == sums[0] for s in sums), sums
    assert len(set(sums[0].values())) == 3, "the weights must change at every outer step"
    for p in procs:
        out = p.output()
        for k in (1, 2, 3):
            assert f"DiLoCo: Number of inner optimizer steps completed: {4 * k}" in out
            assert f"DiLoCo: Number of outer optimizer steps completed: [{k}] loss = " in out
    assert (ckpt / "step_00000003" / "MANIFEST.global.json").exists()
    for g in range(groups):
        assert (ckpt / "step_00000003" / f"MANIFEST.replica_group_{g}.json").exists()


@pytest.mark.parametrize("extra", [[], ["--fragments", "2", "--overlap-steps", "1"]], ids=["blocking", "streaming"])
def test_same_global_weights_as_torchft_diloco(tmp_path, extra):
    """Our outer loop and torchft.local_sgd.DiLoCo, same model, data and optimizers: same global weights (and,
    streaming, the same fragments: torchft's sharing one outer optimizer once made its own groups part ways)."""
    results = {}
    for impl in ("torchft", "torchx_diloco"):
        lighthouse = Lighthouse(tmp_path, min_replicas=2)
        url = str(tmp_path / f"ckpt-{impl}")
        run_groups(
            2,
            lighthouse.url,
            [
                *SMALL,
                "--outer-steps",
                "3" if not extra else "6",
                "--sync-every",
                "5" if not extra else "6",
                "--min-replicas",
                "2",
                "--impl",
                impl,
                "--checkpoint-dir",
                url,
                *extra,
            ],
            tmp_path / "",
            timeout=240,
        )
        lighthouse.kill()
        results[impl] = final_weights(url)
    ours, theirs = results["torchx_diloco"], results["torchft"]
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    # and the run did move the weights: the comparison is not between two untouched initialisations
    torch.manual_seed(0)
    from torchx_diloco.model import build_model

    init = dict(build_model("nano", block_size=32).named_parameters())
    assert any(not torch.allclose(ours[n], init[n].detach()) for n in ours)


def wait_for_step(metrics: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists():
            done = committed(read_metrics(metrics))
            if done and done[-1]["outer_step"] >= step:
                return
        time.sleep(0.2)
    raise AssertionError(f"{metrics} did not reach outer step {step}")


@pytest.mark.parametrize(
    "extra", [[], ["--fragments", "4", "--overlap-steps", "2", "--codec", "int4"]], ids=["blocking", "streaming"]
)
def test_late_group_heals_from_peer_and_matches(tmp_path, extra):
    """A group that starts while the other is at outer step >= 3 gets the global state from its peer (streaming:
    mid-schedule, and it rejoins at the fragment the others are syncing)."""
    lighthouse = Lighthouse(tmp_path, min_replicas=1)
    ckpt = tmp_path / "ckpt"  # shared, but only the last step is checkpointed: the late group finds nothing
    args = [
        *SMALL,
        "--outer-steps",
        "25",
        "--sync-every",
        "100" if extra else "60",  # streaming: 25 inner steps per outer step, time for the late group to come
        "--group-wait",
        "0",
        "--checkpoint-every",
        "1000",
        "--checkpoint-dir",
        str(ckpt),
        *extra,
    ]
    g0 = Group(0, 2, lighthouse.url, args, tmp_path)
    wait_for_step(ckpt / "metrics" / "replica_group_0.jsonl", 3)
    g1 = Group(1, 2, lighthouse.url, args, tmp_path)
    assert g0.wait() == 0, g0.output()[-2000:]
    assert g1.wait() == 0, g1.output()[-2000:]
    lighthouse.kill()
    s0, s1 = committed_checksums(ckpt, 0), committed_checksums(ckpt, 1)
    assert min(s1) > 3, "the late group joined at the others' step, not from scratch"
    assert 25 in s1
    common = sorted(set(s0) & set(s1))
    assert len(common) >= 2, (s0, s1)
    assert all(s0[k] == s1[k] for k in common), (s0, s1)
    assert "healed from a peer" in g1.output()
    if extra:  # every group synced fragment (s - 1) % 4 at outer step s, the late one included
        for g in range(2):
            records = committed(read_metrics(ckpt / "metrics" / f"replica_group_{g}.jsonl"))
            assert all(r["fragment"] == (r["outer_step"] - 1) % 4 for r in records), records
    # and quietly: without the two harmless library messages a heal prints (train.configure_logging)
    assert "NCCL flight recorder" not in g1.output() and "buffer is not writable" not in g1.output()


def test_lighthouse_killed_and_restarted_mid_run_groups_wait_and_continue(tmp_path):
    """The groups retry the quorum (bounded by --lighthouse-timeout) until a new lighthouse answers."""
    lighthouse = Lighthouse(tmp_path, idle_exit=0)
    ckpt = tmp_path / "ckpt"
    args = [
        *SMALL,
        "--outer-steps",
        "10",
        "--sync-every",
        "50",
        "--quorum-timeout",
        "5",
        "--lighthouse-timeout",
        "90",
        "--checkpoint-dir",
        str(ckpt),
    ]
    groups = [Group(g, 2, lighthouse.url, args, tmp_path) for g in range(2)]
    wait_for_step(ckpt / "metrics" / "replica_group_0.jsonl", 3)
    lighthouse.kill()
    time.sleep(6)  # longer than a window: a sync happens while it is away
    lighthouse.start()  # same port, empty state: no quorum history, no heartbeats
    for g in groups:
        assert g.wait() == 0, g.output()[-2000:]
    lighthouse.kill()
    sums = [committed_checksums(ckpt, g) for g in range(2)]
    assert max(sums[0]) == 10 and max(sums[1]) == 10
    common = sorted(set(sums[0]) & set(sums[1]))
    assert [k for k in common if k > 3], "both groups trained together after the restart"
    assert all(sums[0][k] == sums[1][k] for k in common)
    assert any("retrying until the lighthouse answers" in g.output() for g in groups)
