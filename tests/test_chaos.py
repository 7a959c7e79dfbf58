"""Chaos, CI size: three torchrun groups lose workers to SIGKILL, the whole job dies twice, a group is frozen past
the end of the run; one history survives each.

The long form (20 worker kills, 10 whole-job restarts, a summary table) is ``scripts/chaos.py``; both use
``torchx_diloco/_fleet/chaos.py``, whose docstring defines the invariant checked here.
"""

from __future__ import annotations

import os
import random

import pytest

from torchx_diloco._fleet import chaos

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("CHAOS_SEED", "20261125"))


# Streaming DiLoCo with overlap and int8 syncs: 4 fragment syncs (outer steps) per 40 inner steps
STREAMING = ["--fragments", "4", "--overlap-steps", "1", "--codec", "int8"]


@pytest.mark.timeout(300)
def test_worker_kills_during_inner_steps_sync_and_checkpoint_leave_one_history(tmp_path):
    """Streaming with overlap and int8, the path with the most in flight at a kill (a fragment's exchange running
    beside inner steps). Blocking syncs' kills: test_run_e2e's and test_slurm's killed workers, the whole-job
    restarts below, and scripts/chaos.py's long run (blocking unless --train-args says otherwise)."""
    extra, outer_steps = STREAMING, 160
    print(f"chaos seed {SEED} (set CHAOS_SEED to replay)")
    kills, audit = chaos.worker_kills(
        tmp_path, kills=3, rng=random.Random(SEED), outer_steps=outer_steps, sync_every=40, extra=[*chaos.PACED, *extra]
    )
    assert len(kills) == 3, "the run ended before three kills: give it more outer steps"
    assert {k.phase for k in kills} == set(chaos.PHASES)
    for k in kills:  # torchrun restarted every victim and it committed again, ahead of where it died
        assert k.recovered_step is not None and k.recovered_step >= k.step, k
        assert k.how in ("resumed", "resumed+healed", "healed"), k
    assert audit.problems == [], audit.problems
    assert audit.committed_steps == outer_steps and audit.latest_checkpoint == outer_steps
    assert audit.mismatches == 0 and audit.lost == 0 and audit.recommitted == 0
    assert audit.checkpoints_checked >= 1


@pytest.mark.timeout(300)
def test_whole_job_killed_twice_resumes_from_newest_checkpoint_and_matches_uninterrupted(tmp_path):
    print(f"chaos seed {SEED} (set CHAOS_SEED to replay)")
    # two groups, not three: six processes on two cores made this the suite's slowest test, and a whole-job
    # restart tests the same with two
    restarts, audit, reference = chaos.whole_job_restarts(
        tmp_path, count=2, rng=random.Random(SEED), outer_steps=16, sync_every=20, groups=2
    )
    assert len(restarts) == 2
    for r in restarts:  # the next life started from the newest complete checkpoint, nothing earlier
        assert r.first_step_after == r.latest_checkpoint + 1, r
    assert audit.problems == [], audit.problems
    assert reference.problems == [], reference.problems
    assert audit.final_sha == reference.final_sha, "the interrupted run must end with the uninterrupted weights"
    assert audit.redone_same == audit.recommitted, "a step trained again after a restart gave different weights"


@pytest.mark.timeout(200)
def test_group_frozen_until_its_peers_finish_adopts_their_checkpoint_instead_of_forking(tmp_path):
    """Found by the chaos harness: the thawed group used to train the rest alone and rewrite the final checkpoint."""
    audit = chaos.pause_until_peers_finish(tmp_path, outer_steps=20, pause_at=6)
    assert audit.problems == [], audit.problems
    frozen = (tmp_path / "group0-pause-min1.log").read_text(errors="replace")
    assert "its peers published step" in frozen, frozen[-3000:]
    assert audit.latest_checkpoint == 20 and audit.mismatches == 0
