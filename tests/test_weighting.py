"""The average weighted by work: three groups in one process (threads), a real lighthouse and real Managers.

Each group's pseudo-gradient weighs in a fragment's average by the tokens it trained on since the fragment's last
sync (``tokens_per_step`` x inner steps); the header's sum tells every group the total before any payload moves.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import pytest
import torch

torchft = pytest.importorskip("torchft")

from tests.conftest import run_in_groups  # noqa: E402
from tests.test_error_feedback import drift, make_model  # noqa: E402
from torchx_diloco.diloco import DiLoCo  # noqa: E402

GROUPS, H, SYNCS, LR = 3, 2, 3, 0.7


def weighted_run(
    tokens: Sequence[int], codec: str = "fp32", fragments: int = 1, hs: Sequence[int] = (H,) * GROUPS
) -> List[Dict[str, Any]]:
    """Each group's global weights after every sync; group g takes ``hs[g]`` inner steps per sync."""
    models = [make_model() for _ in range(GROUPS)]

    def work(g: int, manager: Any) -> Dict[str, Any]:
        model = models[g]
        params = list(model.parameters())
        inner, outer = torch.optim.SGD(params, lr=0.1), torch.optim.SGD(params, lr=LR)
        diloco = DiLoCo(
            manager, model, inner, outer, sync_every=hs[g], fragments=fragments, codec=codec, tokens_per_step=tokens[g]
        )
        history = []
        for step in range(SYNCS * hs[g]):
            with torch.no_grad():
                for p, d in zip(params, drift(g, step, [p.shape for p in params]), strict=True):
                    p.sub_(d)
            if diloco.step():
                history.append(torch.cat([t.reshape(-1) for t in diloco.global_weights()]))
        diloco.close()
        return {"history": history}

    return run_in_groups(GROUPS, work)


def by_hand(tokens: Sequence[int], hs: Sequence[int] = (H,) * GROUPS) -> List[torch.Tensor]:
    """Plain SGD outer steps on the work-weighted average of the groups' pseudo-gradients."""
    params = list(make_model().parameters())
    shapes = [p.shape for p in params]
    global_ = torch.cat([p.detach().reshape(-1) for p in params])
    history = []
    for sync in range(SYNCS):
        deltas = []
        for g in range(GROUPS):
            h = hs[g]
            moved = sum(torch.cat([d.reshape(-1) for d in drift(g, sync * h + k, shapes)]) for k in range(h))
            deltas.append(moved)  # global - local after h inner steps from the global weights
        work = [t * h for t, h in zip(tokens, hs, strict=True)]
        average = sum(w * d for w, d in zip(work, deltas, strict=True)) / sum(work)
        global_ = global_ - LR * average
        history.append(global_.clone())
    return history


def test_each_groups_pseudo_gradient_weighs_by_the_tokens_it_trained_on() -> None:
    """Groups of 1, 2 and 3 units of tokens per inner step: every group's global weights are the outer step of the
    work-weighted average (to float tolerance: the ring sums in its own order), identical in every group, and not
    the plain mean's."""
    ours, reference, plain = weighted_run([1, 2, 3]), by_hand([1, 2, 3]), by_hand([1, 1, 1])
    for sync in range(SYNCS):
        assert all(torch.equal(r["history"][sync], ours[0]["history"][sync]) for r in ours), sync
        assert torch.allclose(ours[0]["history"][sync], reference[sync], rtol=0, atol=1e-6), sync
    assert not torch.allclose(ours[0]["history"][-1], plain[-1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("codec,fragments", [("fp32", 1), ("int8", 2)])
def test_equal_work_is_the_plain_mean_bit_for_bit(codec: str, fragments: int) -> None:
    """Groups that all train on 4096 tokens a step end with exactly the weights of groups that count one: the scale
    of equal work is 1.0, and nothing is multiplied."""
    counted, unit = weighted_run([4096] * GROUPS, codec, fragments), weighted_run([1] * GROUPS, codec, fragments)
    for a, b in zip(counted[0]["history"], unit[0]["history"], strict=True):
        assert torch.equal(a, b)


def test_a_weighted_int8_sync_is_close_to_the_fp32_one() -> None:
    """The weights travel through a lossy codec too (each group scales its payload before encoding)."""
    fp32, int8 = weighted_run([1, 2, 3]), weighted_run([1, 2, 3], "int8")
    assert torch.allclose(fp32[0]["history"][-1], int8[0]["history"][-1], rtol=0, atol=2e-3)
    assert all(torch.equal(r["history"][-1], int8[0]["history"][-1]) for r in int8)


def test_groups_of_their_own_h_meet_at_each_sync_and_weigh_by_the_steps_they_took() -> None:
    """A slower group takes fewer inner steps per outer step (H of 4, 4 and 1 here, with batches of 1, 1 and 3
    units): the groups still meet at every sync, their global weights are identical, and each pseudo-gradient
    weighs by inner steps x tokens per step (4, 4 and 3), which weighting by the inner steps alone
    would not give."""
    hs, tokens = (4, 4, 1), (1, 1, 3)
    ours = weighted_run(tokens, hs=hs)
    reference, by_steps_alone = by_hand(tokens, hs), by_hand([1, 1, 1], hs)
    assert all(len(r["history"]) == SYNCS for r in ours)
    for sync in range(SYNCS):
        assert all(torch.equal(r["history"][sync], ours[0]["history"][sync]) for r in ours), sync
        assert torch.allclose(ours[0]["history"][sync], reference[sync], rtol=0, atol=1e-6), sync
    assert not torch.allclose(ours[0]["history"][-1], by_steps_alone[-1], rtol=0, atol=1e-4)


def test_auto_h_gives_a_slower_group_fewer_steps_from_its_measured_step_times() -> None:
    """``--sync-every auto:8`` (``AutoH(8)``): group 2's inner steps take twice as long as the others' (each group
    on a clock of its own, advanced by its step's cost: the times are exact). The first round is 8 steps for all;
    from the step times in its header every group then decides 8, 8 and 4, the groups still meet at every sync,
    their global weights are identical and are the outer steps of the average weighted by steps x tokens. The H
    a group decided is in its rank state (its checkpoints), and a resume takes it from there."""
    from torchx_diloco.pace import AutoH

    top, cost = 8, (1.0, 1.0, 2.0)
    models, clocks = [make_model() for _ in range(GROUPS)], [[0.0] for _ in range(GROUPS)]

    def work(g: int, manager: Any) -> Dict[str, Any]:
        params = list(models[g].parameters())
        inner, outer = torch.optim.SGD(params, lr=0.1), torch.optim.SGD(params, lr=LR)
        diloco = DiLoCo(
            manager, models[g], inner, outer, sync_every=AutoH(top), group=g, groups=GROUPS, clock=lambda: clocks[g][0]
        )
        history, hs, clock, step = [], [], [], 0
        while manager.current_step() < SYNCS:
            clock.append(diloco.upcoming().inner_step)
            with torch.no_grad():
                for p, d in zip(params, drift(g, step, [p.shape for p in params]), strict=True):
                    p.sub_(d)
            step += 1
            clocks[g][0] += cost[g]  # this inner step's time, on the group's own clock
            if diloco.step():
                history.append(torch.cat([t.reshape(-1) for t in diloco.global_weights()]))
                hs.append(diloco.schedule.sync_every)
        saved = diloco.rank_state()
        diloco.load_rank_state({"sync_every": torch.tensor([3])})  # what a resume from another step would read
        resumed = diloco.schedule.sync_every
        diloco.close()
        return {"history": history, "hs": hs, "clock": clock, "saved": int(saved["sync_every"][0]), "resumed": resumed}

    ours = run_in_groups(GROUPS, work)
    assert [r["hs"] for r in ours] == [[8] * SYNCS, [8] * SYNCS, [4] * SYNCS]  # each after a sync: the next window's
    assert [r["saved"] for r in ours] == [8, 8, 4] and all(r["resumed"] == 3 for r in ours)
    # the run's clock (the learning-rate schedule's) counts in the fastest group's steps: group 2 moves 2 a step
    assert ours[2]["clock"][:10] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]
    # by hand: group g's inner steps are counted across rounds; round 1 takes 8 each, the others 8, 8 and 4
    shapes = [p.shape for p in make_model().parameters()]
    global_, steps_done = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()]), [0] * GROUPS
    for sync in range(SYNCS):
        hs = (top,) * GROUPS if sync == 0 else (8, 8, 4)
        deltas = []
        for g in range(GROUPS):
            deltas.append(
                sum(torch.cat([d.reshape(-1) for d in drift(g, steps_done[g] + k, shapes)]) for k in range(hs[g]))
            )
            steps_done[g] += hs[g]
        global_ = global_ - LR * sum(h * d for h, d in zip(hs, deltas, strict=True)) / sum(hs)
        assert all(torch.equal(r["history"][sync], ours[0]["history"][sync]) for r in ours), sync
        assert torch.allclose(ours[0]["history"][sync], global_, rtol=0, atol=1e-6), sync


def test_auto_h_and_what_it_cannot_adapt_yet_are_refused_in_one_line() -> None:
    from torchx_diloco.config import parse_flags
    from torchx_diloco.errors import UserError
    from torchx_diloco.pace import AutoH, next_sync_every

    assert parse_flags(["--sync-every", "auto:40"]).diloco.sync_every == AutoH(40)
    assert isinstance(parse_flags(["--sync-every", "auto:40"]).diloco.sync_every, AutoH)
    assert next_sync_every(40, [0.1, 0.1, 0.3], 0.3) == 13 and next_sync_every(40, [0.1, 0.0], 0.1) == 40
    assert next_sync_every(40, [0.001, 1.0], 1.0) == 1 and next_sync_every(40, [0.0, 0.0], 0.0) == 40
    for argv, line in [
        (["--sync-every", "auto:40", "--fragments", "2"], r"auto:40 adapts one whole-model sync per round: it needs"),
        (["--sync-every", "auto:40", "--impl", "torchft"], r"needs --impl torchx_diloco"),
        (["--sync-every", "auto:40,auto:40"], r"auto:H is one value for all groups"),
        (["--sync-every", "auto:0"], r"0 must be >= 1"),
    ]:
        with pytest.raises((UserError, SystemExit), match=line if "0 must" not in line else None):
            parse_flags(argv, num_replica_groups=2)
