"""Replica groups as separate processes around a real lighthouse: agreement, equivalence, healing, resume."""

from __future__ import annotations

import re

import pytest
import torch

from tests.conftest import hold_at, printed_step, wait_until
from torchx_diloco._fleet.testing import (
    Group,
    Lighthouse,
    committed,
    committed_checksums,
    metrics_url,
    read_metrics,
    run_groups,
)
from torchx_diloco.checkpoint import GLOBAL_PART, CheckpointStore
from torchx_diloco.cluster import lighthouse_status

pytestmark = pytest.mark.slow

SMALL = ["--model", "nano", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--group-wait", "20"]


def final_weights(ckpt_url: str) -> dict:
    store = CheckpointStore(ckpt_url)
    return store.read_part(store.steps()[-1], GLOBAL_PART)["diloco"]["global_weights"]


@pytest.mark.parametrize("groups", [3])  # 2 groups agreeing step by step: every other test of this file
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


def waiting_for_quorum(url: str) -> int:
    """How many healthy replicas wait in the lighthouse's next quorum (its /status: "[n/m participants healthy]")."""
    found = re.search(r"\[(\d+)/\d+ participants healthy\]", lighthouse_status(url))
    return int(found[1]) if found else 0


OUTER = 8


EAGER = ["--fragments", "2", "--outer-delay", "1", "--codec", "int2"]


@pytest.mark.parametrize(
    "extra",
    [[], ["--fragments", "4", "--overlap-steps", "2", "--codec", "int4"], EAGER],
    ids=["blocking", "streaming", "eager"],
)
def test_late_group_heals_from_peer_and_matches(tmp_path, faulty_url, extra):
    """A group that starts while the other is at outer step 3 gets the global state from its peer (streaming:
    mid-schedule, and it rejoins at the fragment the others are syncing; eager outer steps: at the quorum after
    the others applied step 4, sending zeros for the round it joins and starting from the global weights).

    Whatever the machine's speed: the early group is held after step 3 (its checkpoint of step 3 waits, so that
    nothing is in storage for the late group to resume from) until the late one waits at the lighthouse for its
    first quorum, which torchft forms only once the early group, healthy, joins it."""
    lighthouse = Lighthouse(tmp_path, min_replicas=1)
    ckpt, release = faulty_url, tmp_path / "release"
    args = [
        *SMALL,
        "--outer-steps",
        str(OUTER),
        "--sync-every",
        "12" if "--overlap-steps" in extra else "6",  # streaming: 3 inner steps per outer step, more than tau
        "--group-wait",
        "0",
        "--checkpoint-every",
        "3",
        "--checkpoint-dir",
        ckpt,
        *extra,
    ]
    g0 = Group(0, 2, lighthouse.url, args, tmp_path, extra_env=hold_at(3, release))
    g1 = None
    try:
        wait_until("outer step 3 of group 0", printed_step(g0, 3), [g0])
        g1 = Group(1, 2, lighthouse.url, args, tmp_path)
        wait_until("a quorum request of group 1", lambda: waiting_for_quorum(lighthouse.url) >= 1, [g0, g1])
        release.touch()
        assert g0.wait() == 0, g0.output()[-2000:]
        assert g1.wait() == 0, g1.output()[-2000:]
    finally:
        for p in (g0, g1):
            if p is not None:
                p.kill()
        lighthouse.kill()
    s0, s1 = committed_checksums(ckpt, 0), committed_checksums(ckpt, 1)
    assert list(s0) == list(range(1, OUTER + 1)), s0
    assert min(s1) > 3, "the late group joined at the others' step, not from scratch"
    assert list(s1) == list(range(min(s1), OUTER + 1)) and len(s1) >= 2, s1
    assert all(s0[k] == s1[k] for k in s1), (s0, s1)
    healed_at = 4 if extra is EAGER else 3  # (eagerly, the quorum comes after the window's outer step)
    assert f"healed from a peer: now at outer step {healed_at}" in g1.output() and "resumed from" not in g1.output()
    if extra:  # every group synced fragment (s - 1) % P at outer step s, the late one included
        fragments = int(extra[extra.index("--fragments") + 1])
        for g in range(2):
            records = committed(read_metrics(metrics_url(ckpt, g)))
            assert all(r["fragment"] == (r["outer_step"] - 1) % fragments for r in records), records
    # and quietly: without the two harmless library messages a heal prints (train.configure_logging)
    assert "NCCL flight recorder" not in g1.output() and "buffer is not writable" not in g1.output()


def test_lighthouse_killed_and_restarted_mid_run_groups_wait_and_continue(tmp_path, faulty_url):
    """The groups retry the quorum (bounded by --lighthouse-timeout) until a new lighthouse answers.

    min_replicas=2: with 1, a group whose quorum request reaches the new lighthouse before the other group's
    first heartbeat gets a quorum of its own, whose id (1, the new lighthouse's first) can equal the one it had
    before; torchft then keeps the old two-group process group and that group's all-reduce waits out
    --collective-timeout for a peer that is not in its quorum (seen in 3 of 5 runs here)."""
    lighthouse = Lighthouse(tmp_path, min_replicas=2, idle_exit=0)
    ckpt, release = faulty_url, tmp_path / "release"
    args = [
        *SMALL,
        "--outer-steps",
        "6",
        "--sync-every",
        "20",
        "--quorum-timeout",
        "3",
        "--lighthouse-timeout",
        "90",
        "--checkpoint-dir",
        ckpt,
    ]
    # both held after step 3 (see hold_at) until the lighthouse is gone: it dies mid-run however fast they train
    groups = [Group(g, 2, lighthouse.url, args, tmp_path, extra_env=hold_at(3, release)) for g in range(2)]
    retried = lambda: any("retrying until the lighthouse answers" in g.output() for g in groups)  # noqa: E731
    try:
        for g in groups:
            wait_until(f"outer step 3 of group {g.group}", printed_step(g, 3), groups)
        lighthouse.kill()
        release.touch()
        wait_until("a quorum retried while the lighthouse is away", retried, groups)  # however long a window takes
        lighthouse.start()  # same port, empty state: no quorum history, no heartbeats
        for g in groups:
            assert g.wait() == 0, g.output()[-2000:]
    finally:
        for g in groups:
            g.kill()
        lighthouse.kill()
    sums = [committed_checksums(ckpt, g) for g in range(2)]
    assert max(sums[0]) == 6 and max(sums[1]) == 6
    common = sorted(set(sums[0]) & set(sums[1]))
    assert [k for k in common if k > 3], "both groups trained together after the restart"
    assert all(sums[0][k] == sums[1][k] for k in common)
