"""Stragglers: a group that does not reach a sync within the grace is left out of that round and heals at the next.

Three groups in one process (threads), a real lighthouse and real Managers. The grace is the lighthouse's join
timeout (``--straggler_grace_s`` of the components, docs/unlike-groups.md): a quorum waits that long for a group of
the previous one, then the others commit without it. The straggler here is held until the others have committed
the round without it (an event, not a speed): if they waited for it, nobody would let it go.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List

import pytest
import torch

torchft = pytest.importorskip("torchft")

from tests.conftest import run_in_groups  # noqa: E402
from tests.test_error_feedback import drift, make_model  # noqa: E402
from torchx_diloco.diloco import DiLoCo  # noqa: E402

GROUPS, H, OUTER_STEPS, STRAGGLER, STALLED = 3, 2, 8, 2, 3  # group 2 misses the sync that commits outer step 3
GRACE_MS = 2000


def test_a_straggler_is_left_out_after_the_grace_and_heals_at_the_next_sync() -> None:
    """Groups 0 and 1 commit outer step 3 without group 2 (two participants) while it is held; let go, it joins a
    later sync, heals from them (its own pseudo-gradient of the missed round counts for nothing) and from then on
    every group commits with three participants and the same global weights."""
    models = [make_model() for _ in range(GROUPS)]
    released = threading.Event()

    def work(g: int, manager: Any) -> List[Dict[str, Any]]:
        model = models[g]
        params = list(model.parameters())
        inner, outer = torch.optim.SGD(params, lr=0.1), torch.optim.SGD(params, lr=0.7)
        diloco = DiLoCo(manager, model, inner, outer, sync_every=H)
        commits, step = [], 0
        while manager.current_step() < OUTER_STEPS:
            if g == STRAGGLER and manager.current_step() == STALLED - 1 and diloco.upcoming().ends_window:
                # stalled before its sync, heartbeating: the others must go on without it
                assert released.wait(120), "groups 0 and 1 did not commit without the straggler: they waited for it"
            with torch.no_grad():
                for p, d in zip(params, drift(g, step, [p.shape for p in params]), strict=True):
                    p.sub_(d)
            step += 1
            if diloco.step():
                flat = torch.cat([t.reshape(-1) for t in diloco.global_weights()])
                commits.append({"step": manager.current_step(), "participants": manager.num_participants(), "w": flat})
                if g == 0 and manager.current_step() == STALLED:
                    released.set()
        diloco.close()
        return commits

    runs = run_in_groups(GROUPS, work, min_replicas=2, join_timeout_ms=GRACE_MS)
    by_step = [{c["step"]: c for c in commits} for commits in runs]
    assert by_step[0][STALLED]["participants"] == by_step[1][STALLED]["participants"] == 2
    assert torch.equal(by_step[0][STALLED]["w"], by_step[1][STALLED]["w"])
    assert STALLED not in by_step[STRAGGLER]  # it committed no step of its own there: it healed past it
    # back at the first quorum after its own request reached the lighthouse (the next sync, or the one after when
    # the others' next quorum formed first): from then on, every group in every sync, with the same weights
    back = min(step for step in by_step[STRAGGLER] if step > STALLED)
    assert back < OUTER_STEPS, by_step[STRAGGLER].keys()
    for step in range(back, OUTER_STEPS + 1):
        assert [s[step]["participants"] for s in by_step] == [GROUPS] * GROUPS, step
        assert all(torch.equal(s[step]["w"], by_step[0][step]["w"]) for s in by_step), step
    assert all(s[step]["participants"] == GROUPS for s in by_step for step in range(1, STALLED))  # all in, before
