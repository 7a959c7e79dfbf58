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
