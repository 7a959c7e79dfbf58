"""Eager outer steps (``outer_delay=1``, Kale et al. arXiv 2502.12996), three groups in one process (threads), a real
lighthouse and real Managers.

The reference is the math by hand with plain tensors (the codec's own encode and decode for the exchange, as in
tests/test_error_feedback.py): the round sent at the end of window k is applied to the global weights at the end
of window k + 1, and each group's next window starts from the outer optimizer's step from the global weights with
its own pseudo-gradient standing in for the average in flight (on a copy of the optimizer's momentum).
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

torchft = pytest.importorskip("torchft")

from tests.conftest import run_in_groups  # noqa: E402
from tests.test_error_feedback import EF_ARGS, Stopped, drift, exchange_by_hand, make_model  # noqa: E402
from torchx_diloco.codecs import get_codec  # noqa: E402
from torchx_diloco.diloco import DiLoCo  # noqa: E402

GROUPS, FRAGMENTS, SYNCS = 3, 2, 6  # H=2, two fragments: every inner step ends a window
LR, MOMENTUM = 0.7, 0.9


def groups_run(codec: str, fragments: int, momentum: float, gate: bool = False) -> List[Dict[str, Any]]:
    """Each group's global and local weights after every window's end, and after the last round's ``sync()``.

    ``gate``: a round's exchange cannot finish before its group has trained the whole next window (it waits for
    the window's last inner step): a ``step()`` that waited for the exchange would never return."""
    models = [make_model() for _ in range(GROUPS)]

    def work(g: int, manager: Any) -> Dict[str, Any]:
        model = models[g]
        params = list(model.parameters())
        inner = torch.optim.SGD(params, lr=0.1)  # never stepped: drift() is the inner training
        outer = torch.optim.SGD(params, lr=LR, momentum=momentum, nesterov=momentum > 0)
        diloco = DiLoCo(
            manager, model, inner, outer, sync_every=fragments, fragments=fragments, codec=codec, outer_delay=1,
            error_feedback=codec != "fp32",
        )  # fmt: skip
        trained = [threading.Event() for _ in range(SYNCS + 1)]  # trained[k]: window k's inner step is done
        sent = [0]
        stalled: List[int] = []
        if gate:
            run = diloco._exchange.run

            def gated(*args: Any) -> int:
                k = sent[0]
                sent[0] += 1
                if not trained[k + 1].wait(30):
                    stalled.append(k)
                return run(*args)

            diloco._exchange.run = gated  # type: ignore[method-assign]
        history = []
        for step in range(SYNCS):
            with torch.no_grad():
                for p, d in zip(params, drift(g, step, [p.shape for p in params]), strict=True):
                    p.sub_(d)
            trained[step].set()
            committed = diloco.step()
            assert committed == (step > 0), "every window's end but the first applies the round before it"
            history.append(
                {
                    "global": torch.cat([t.reshape(-1) for t in diloco.global_weights()]),
                    "local": torch.cat([p.detach().reshape(-1) for p in params]),
                }
            )
        trained[SYNCS].set()
        assert diloco.sync(), "the last round lands"
        history.append({"global": torch.cat([t.reshape(-1) for t in diloco.global_weights()]), "local": None})
        diloco.close()
        return {"history": history, "step": manager.current_step(), "stalled": stalled}

    return run_in_groups(GROUPS, work)


def nesterov_step(weights: torch.Tensor, grad: torch.Tensor, buf: Any, momentum: float) -> Any:
    """torch's SGD step, the same tensor ops (plain SGD without momentum)."""
    if momentum == 0:
        weights.add_(grad, alpha=-LR)
        return None
    buf = grad.clone() if buf is None else buf.mul_(momentum).add_(grad)
    weights.add_(grad.add(buf, alpha=momentum), alpha=-LR)
    return buf


def by_hand(codec_name: str, fragments: int, momentum: float) -> List[List[Dict[str, Any]]]:
    codec = get_codec(codec_name)
    params = list(make_model().parameters())
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    cuts = [(0, sum(sizes[:2])), (sum(sizes[:2]), sum(sizes))] if fragments == 2 else [(0, sum(sizes))]
    members = [[0, 1], [2, 3, 4, 5]] if fragments == 2 else [list(range(len(sizes)))]
    initial = torch.cat([p.detach().reshape(-1) for p in params])
    global_ = initial.clone()
    local = [initial.clone() for _ in range(GROUPS)]
    start = [initial.clone() for _ in range(GROUPS)]
    residual = [[torch.zeros(b - a) for a, b in cuts] for _ in range(GROUPS)]
    bufs: Dict[int, Any] = {}
    history: List[List[Dict[str, Any]]] = [[] for _ in range(GROUPS)]
    in_flight = None  # (fragment, the summed payload)

    def apply(flight: Any) -> None:
        f, total = flight
        average, offset = total / GROUPS, cuts[f][0]
        for i in members[f]:
            n = sizes[i]
            bufs[i] = nesterov_step(
                global_[offset : offset + n], average[offset - cuts[f][0] :][:n], bufs.get(i), momentum
            )
            offset += n

    def lookahead(f: int, own: torch.Tensor) -> torch.Tensor:
        """The outer step from the global weights with ``own`` for the average, on copies of the momentum."""
        moved, offset = global_[cuts[f][0] : cuts[f][1]].clone(), 0
        for i in members[f]:
            n = sizes[i]
            buf = bufs.get(i)
            nesterov_step(
                moved[offset : offset + n], own[offset : offset + n], None if buf is None else buf.clone(), momentum
            )
            offset += n
        return moved

    for step in range(SYNCS + 1):
        if step == SYNCS:  # the last round's sync()
            apply(in_flight)
            for g in range(GROUPS):
                history[g].append({"global": global_.clone(), "local": None})
            break
        for g in range(GROUPS):
            local[g] -= torch.cat([d.reshape(-1) for d in drift(g, step, shapes)])
        if in_flight is not None:
            apply(in_flight)
        f = step % fragments
        a, b = cuts[f]
        own = [start[g][a:b] - local[g][a:b] for g in range(GROUPS)]
        meant = [own[g] + residual[g][f] for g in range(GROUPS)] if codec_name != "fp32" else own
        total, sent = exchange_by_hand(codec, [m.clone() for m in meant])
        if codec_name != "fp32":
            for g in range(GROUPS):
                residual[g][f] = meant[g] - sent[g]
        in_flight = (f, total)
        for g in range(GROUPS):  # the eager start: the outer step with the group's own for the average
            start[g][a:b] = lookahead(f, own[g])
            local[g][a:b] = start[g][a:b]
            history[g].append({"global": global_.clone(), "local": local[g].clone()})
    return history


@pytest.mark.parametrize("codec", ["int8", "int2"])
def test_eager_outer_steps_through_managers_equal_the_math_by_hand(codec: str) -> None:
    """Three groups, two fragments, Nesterov outer steps, error feedback: after every window's end each group's global
    and local weights equal the by-hand reference bit for bit, and the groups' global weights are identical."""
    ours, reference = groups_run(codec, FRAGMENTS, MOMENTUM), by_hand(codec, FRAGMENTS, MOMENTUM)
    for g in range(GROUPS):
        assert ours[g]["step"] == SYNCS
        for sync, (mine, theirs) in enumerate(zip(ours[g]["history"], reference[g], strict=True)):
            where = f"{codec}, group {g}, window {sync}"
            assert torch.equal(mine["global"], theirs["global"]), where
            assert torch.equal(mine["global"], ours[0]["history"][sync]["global"]), where
            if theirs["local"] is not None:
                assert torch.equal(mine["local"], theirs["local"]), where
    # the local weights are eager: not the global ones, and not the same in two groups
    assert not torch.equal(ours[0]["history"][2]["local"], ours[0]["history"][2]["global"])
    assert not torch.equal(ours[0]["history"][2]["local"], ours[1]["history"][2]["local"])


def test_with_plain_sgd_each_window_starts_a_full_outer_step_ahead_of_the_global_weights() -> None:
    """One fragment, fp32, plain SGD outer steps: a group's window starts at ``global - lr x own`` (its own
    pseudo-gradient in place of the average in flight), and the global weights lag one round behind: after window k
    they hold the averages of rounds 0..k-1."""
    ours = groups_run("fp32", 1, 0.0)
    shapes = [p.shape for p in make_model().parameters()]
    global_ = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])
    for step in range(SYNCS):
        deltas = [torch.cat([d.reshape(-1) for d in drift(g, step, shapes)]) for g in range(GROUPS)]  # start - local
        for g in range(GROUPS):
            assert torch.allclose(ours[g]["history"][step]["global"], global_, rtol=0, atol=1e-6), (g, step)
            expected = global_ - LR * deltas[g]
            assert torch.allclose(ours[g]["history"][step]["local"], expected, rtol=0, atol=1e-6), (g, step)
        global_ = global_ - LR * sum(deltas) / GROUPS


def test_training_never_waits_for_the_exchange() -> None:
    """Each round's exchange is held until its group has trained the whole next window: were a window's end to
    wait for the exchange, the gate would never open (it gives up after 30 s and the test fails). The groups end
    with the by-hand weights all the same."""
    ours = groups_run("int8", FRAGMENTS, MOMENTUM, gate=True)
    assert all(r["stalled"] == [] for r in ours), [r["stalled"] for r in ours]
    reference = by_hand("int8", FRAGMENTS, MOMENTUM)
    assert all(torch.equal(r["history"][-1]["global"], reference[0][-1]["global"]) for r in ours)


def test_a_round_in_flight_is_in_the_rank_state_and_a_template_is_its_size(lighthouse) -> None:
    """What a checkpoint holds of eager outer steps: each fragment's start, the round in flight (before error
    feedback) and whether it contributes; before anything was sent, a template of the next round's size."""
    from tests.conftest import group_manager_for

    model = make_model()
    inner, outer = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=LR)
    manager = group_manager_for(lighthouse)
    try:
        diloco = DiLoCo(manager, model, inner, outer, sync_every=2, fragments=2, codec="int2", outer_delay=1)
        assert set(diloco.rank_state()) == {"fragment_0", "fragment_1", "start_0", "start_1"}
        template = diloco.rank_state(template=True)
        assert template["round"].shape == (144,) and not template["round"].any()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.01)
        diloco.step()  # the first window's end: fragment 0 sent
        state = diloco.rank_state()
        assert torch.allclose(state["round"], torch.full((144,), 0.01), atol=1e-6)
        assert state["round_work"] == 1  # one inner step of one token (tokens_per_step 1)
        diloco.close()
    finally:
        manager.shutdown(wait=False)


def _trainer(lighthouse: str, folder: Path, outer_steps: int) -> Any:
    from torchx_diloco.config import parse_config
    from torchx_diloco.train import Trainer

    env = {"REPLICA_GROUP_ID": "0", "NUM_REPLICA_GROUPS": "1", "TORCHFT_LIGHTHOUSE": lighthouse}
    args = [*EF_ARGS, "--outer-delay", "1", "--outer-steps", str(outer_steps), "--checkpoint-dir", str(folder)]
    return Trainer(parse_config(args, env))


def test_a_resume_sends_the_saved_round_again_and_trains_on_bit_for_bit(lighthouse, tmp_path) -> None:
    """The trainer with eager outer steps (two fragments, int2 with error feedback): a run stopped after 3 outer
    steps and resumed ends with the global weights of an uninterrupted 6-step run, step by step (the round in
    flight at the checkpoint is sent again); both runs apply the last round before they end."""
    from torchx_diloco._fleet.testing import committed_checksums
    from torchx_diloco.checkpoint import CheckpointStore

    whole = _trainer(lighthouse, tmp_path / "whole", 6)
    assert whole.run() == 0 and whole.manager.current_step() == 6
    first = _trainer(lighthouse, tmp_path / "stopped", 6)
    save = first.checkpointer.save

    def save_then_stop(step: int, *args: Any) -> None:
        save(step, *args)
        if step == 3:
            raise Stopped

    first.checkpointer.save = save_then_stop  # type: ignore[method-assign]
    with pytest.raises(Stopped):
        first.run()
    saved = CheckpointStore(str(tmp_path / "stopped")).latest(0)
    assert saved.step == 3 and {"round", "start_0", "start_1"} <= set(saved.group_state["rank_state"])
    resumed = _trainer(lighthouse, tmp_path / "stopped", 6)
    assert resumed.run() == 0
    ours, reference = committed_checksums(tmp_path / "stopped", 0), committed_checksums(tmp_path / "whole", 0)
    assert list(reference) == [1, 2, 3, 4, 5, 6]
    assert [ours[s] for s in (4, 5, 6)] == [reference[s] for s in (4, 5, 6)]


def test_the_global_state_a_healing_peer_is_served_stays_as_it_was_at_the_quorum(monkeypatch) -> None:
    """torchft serves a healing peer the state dict it took at the quorum (tensors by reference, not copies) until
    the next commit, while eagerly the group trains a whole window in between: nothing in that window (the eager
    restart steps the outer optimizer on the side) may change those tensors, or the peer heals to a momentum no
    group holds (seen once in CI: a late group's weights differed from its peer's from the next step on)."""
    import torchx_diloco.diloco as diloco_module

    real_quorum = diloco_module.start_quorum
    served: Dict[int, List[Any]] = {}  # group -> (the state dict as taken at the quorum, a copy of its values)
    group_of: Dict[int, int] = {}

    def quorum_taking_the_state(manager: Any, retry_s: float) -> None:
        real_quorum(manager, retry_s)
        state = dilocos[group_of[id(manager)]].state_dict()  # what torchft's _manager_state_dict() references
        served[group_of[id(manager)]].append((state, copy.deepcopy(state)))

    monkeypatch.setattr(diloco_module, "start_quorum", quorum_taking_the_state)
    dilocos: Dict[int, DiLoCo] = {}
    models = [make_model() for _ in range(2)]

    def work(g: int, manager: Any) -> int:
        params = list(models[g].parameters())
        inner = torch.optim.SGD(params, lr=0.1)
        outer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True)
        group_of[id(manager)], served[g] = g, []
        dilocos[g] = DiLoCo(manager, models[g], inner, outer, sync_every=1, outer_delay=1)
        changed, momenta = 0, 0
        for step in range(4):
            with torch.no_grad():
                for p, d in zip(params, drift(g, step, [p.shape for p in params]), strict=True):
                    p.sub_(d)
            if served[g]:  # the window after the last quorum is trained: its commit comes next
                state, copied = served[g][-1]
                momenta += len(state["outer_optimizer"]["state"])
                changed += sum(not torch.equal(a, b) for a, b in zip(_tensors(state), _tensors(copied), strict=True))
            dilocos[g].step()
        assert dilocos[g].sync()
        dilocos[g].close()
        return changed, momenta

    results = run_in_groups(2, work)
    assert all(momenta > 0 for _, momenta in results), "no served state held a momentum to check"
    assert [changed for changed, _ in results] == [0, 0], "the served global state changed before the commit"


def _tensors(tree: Any) -> List[torch.Tensor]:
    if torch.is_tensor(tree):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def test_with_one_group_eager_outer_steps_train_as_blocking_ones_a_window_later() -> None:
    """One group: its own pseudo-gradient is the average, so the eager start is exactly where the blocking outer
    step lands. A real model trained by AdamW (Nesterov outer steps): the local weights match blocking DiLoCo's after
    every window, and the global weights after window k + 1 are blocking's after window k. Anything but the
    stand-in for the average that differed from DiLoCo (an outer step applied twice, a lost window) breaks this."""
    from tests.test_streaming import data_of

    def trained(outer_delay: int) -> List[Dict[str, torch.Tensor]]:
        def work(g: int, manager: Any) -> List[Dict[str, torch.Tensor]]:
            model = make_model()
            x, y = data_of(g)
            inner = torch.optim.AdamW(model.parameters(), lr=0.01)
            outer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True)
            diloco = DiLoCo(manager, model, inner, outer, sync_every=3, outer_delay=outer_delay)
            windows = []
            for step in range(1, 3 * 6 + 1):
                ((model(x) - y) ** 2).mean().backward()
                inner.step()
                inner.zero_grad()
                diloco.step()
                if step % 3 == 0:
                    glob = torch.cat([t.reshape(-1) for t in diloco.global_weights()])
                    windows.append(
                        {"global": glob, "local": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}
                    )
            diloco.close()
            return windows

        return run_in_groups(1, work)[0]

    blocking, eager = trained(0), trained(1)
    for k in range(len(blocking)):
        assert torch.equal(eager[k]["local"], blocking[k]["local"]), f"window {k}: local weights"
        if k + 1 < len(eager):
            assert torch.equal(eager[k + 1]["global"], blocking[k]["global"]), f"window {k}: global weights"
    assert not torch.equal(blocking[1]["global"], blocking[0]["global"])  # the outer steps moved them
