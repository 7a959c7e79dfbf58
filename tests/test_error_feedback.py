"""Error feedback, three groups in one process (threads), real lighthouse and Managers.

The reference is the math done by hand with plain tensors: each group's pseudo-gradient plus its residual, cut
into the chunks the reduce-scatter sends (or the whole payload, for topk's all-gather), each encoded and decoded
with the codec's own functions, the owners' fp32 sums in rank order re-encoded, the outer Nesterov step, and the
residual each group keeps: what it meant to send minus what its own encoded chunks decode to. The groups run the
real ``DiLoCo`` through real Managers; both must agree bit for bit over several syncs of two fragments.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch
import torch.nn as nn

torchft = pytest.importorskip("torchft")

from tests.conftest import run_in_groups  # noqa: E402
from torchx_diloco.codecs import BLOCK, Codec, get_codec  # noqa: E402
from torchx_diloco.diloco import DiLoCo  # noqa: E402

GROUPS, FRAGMENTS, SYNCS = 3, 2, 6  # H=2 with two fragments: one fragment syncs after every inner step
LR, MOMENTUM = 0.7, 0.9
DENSITY = 0.01  # topk: 41 of each 4096 values


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def drift(group: int, step: int, shapes: List[torch.Size]) -> List[torch.Tensor]:
    """What group ``group``'s "inner step" ``step`` subtracts from each parameter (its own data, as it were)."""
    g = torch.Generator().manual_seed(1000 * group + step)
    return [torch.randn(s, generator=g) * 0.01 for s in shapes]


def groups_run(codec: str, error_feedback: bool = True) -> List[Dict[str, Any]]:
    models = [make_model() for _ in range(GROUPS)]  # here: seeding torch's one generator in threads would race

    def work(g: int, manager: Any) -> Dict[str, Any]:
        model = models[g]
        params = list(model.parameters())
        inner = torch.optim.SGD(params, lr=0.1)  # never stepped: drift() is the inner training
        outer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True)
        diloco = DiLoCo(
            manager, model, inner, outer, sync_every=FRAGMENTS, fragments=FRAGMENTS, codec=codec,
            error_feedback=error_feedback, topk_density=DENSITY if codec == "topk" else None,
        )  # fmt: skip
        history = []
        for step in range(SYNCS):
            with torch.no_grad():
                for p, d in zip(params, drift(g, step, [p.shape for p in params]), strict=True):
                    p.sub_(d)
            assert diloco.step(), "every inner step commits one fragment's outer step"
            history.append(
                {
                    "global": torch.cat([t.reshape(-1) for t in diloco.global_weights()]),
                    "local": torch.cat([p.detach().reshape(-1) for p in params]),
                    "residuals": {k: v.clone() for k, v in diloco.rank_state().items()},
                }
            )
        diloco.close()
        return {"history": history, "step": manager.current_step()}

    return run_in_groups(GROUPS, work)


def pad(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    return torch.cat([flat, flat.new_zeros(-flat.numel() % multiple)])


def exchange_by_hand(codec: Codec, payloads: List[torch.Tensor]) -> tuple[torch.Tensor, List[torch.Tensor]]:
    """The sum every group receives, and what each group's codec sent of its own payload (decoded)."""
    numel, n = payloads[0].numel(), len(payloads)
    if codec.gathered:  # topk: every group's whole payload to every group, summed in rank order
        encoded = [codec.encode(pad(x, codec.align)) for x in payloads]
        sent = [codec.decode(b, pad(payloads[0], codec.align).numel())[:numel] for b in encoded]
        total = torch.zeros(pad(payloads[0], codec.align).numel())
        for b in encoded:
            total += codec.decode(b, total.numel())
        return total[:numel], sent
    padded = [pad(x, n * BLOCK) for x in payloads]
    chunk = padded[0].numel() // n
    encoded = [[codec.encode(part) for part in x.split(chunk)] for x in padded]  # [group][owner]
    sent = [torch.cat([codec.decode(b, chunk) for b in row])[:numel] for row in encoded]
    sums = []
    for owner in range(n):
        total = torch.zeros(chunk)
        for g in range(n):
            total += codec.decode(encoded[g][owner], chunk)
        sums.append(codec.decode(codec.encode(total), chunk))
    return torch.cat(sums)[:numel], sent


def nesterov(weights: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor | None) -> torch.Tensor:
    """torch's SGD (momentum 0.9, Nesterov) step, the same tensor ops; returns the momentum buffer."""
    buf = grad.clone() if momentum is None else momentum.mul_(MOMENTUM).add_(grad)
    weights.add_(grad.add(buf, alpha=MOMENTUM), alpha=-LR)
    return buf


def by_hand(codec_name: str) -> List[List[Dict[str, Any]]]:
    """The same run, by hand: per sync, each group's global weights, local weights and residuals."""
    codec = get_codec(codec_name, DENSITY if codec_name == "topk" else None)
    params = list(make_model().parameters())
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    halves = [(0, sum(sizes[:2])), (sum(sizes[:2]), sum(sizes))]  # split_evenly's fragments of this model
    assert [f"{a}-{b}" for a, b in halves] == ["0-144", "144-433"]
    initial = torch.cat([p.detach().reshape(-1) for p in params])
    global_ = initial.clone()
    local = [initial.clone() for _ in range(GROUPS)]
    residual = [[torch.zeros(b - a) for a, b in halves] for _ in range(GROUPS)]
    momentum: List[Any] = [[None, None], [None, None]]  # per fragment: one buffer per parameter of it
    history: List[List[Dict[str, Any]]] = [[] for _ in range(GROUPS)]
    for step in range(SYNCS):
        for g in range(GROUPS):
            local[g] -= torch.cat([d.reshape(-1) for d in drift(g, step, shapes)])
        f = step % FRAGMENTS
        a, b = halves[f]
        payloads = [(global_[a:b] - local[g][a:b]) + residual[g][f] for g in range(GROUPS)]
        total, sent = exchange_by_hand(codec, payloads)
        for g in range(GROUPS):
            residual[g][f] = payloads[g] - sent[g]
        average = total / GROUPS
        # the outer step, parameter by parameter (each parameter has its own momentum buffer)
        first = 0 if f == 0 else 2
        offset = a
        for i, n in enumerate(sizes[first : first + (2 if f == 0 else 4)]):
            bufs = momentum[f]
            while len(bufs) <= i:
                bufs.append(None)
            bufs[i] = nesterov(global_[offset : offset + n], average[offset - a : offset - a + n], bufs[i])
            offset += n
        for g in range(GROUPS):
            local[g][a:b] = global_[a:b]
            history[g].append(
                {
                    "global": global_.clone(),
                    "local": local[g].clone(),
                    "residuals": {f"fragment_{i}": r.clone() for i, r in enumerate(residual[g])},
                }
            )
    return history


@pytest.mark.parametrize("codec", ["int8", "int2", "topk"])
def test_error_feedback_through_managers_equals_the_math_by_hand(codec: str) -> None:
    """Three groups, two fragments, six syncs: every group's global weights, local weights and residuals equal
    the by-hand reference bit for bit after every sync, and the residuals are not zero (the codec is lossy)."""
    ours, reference = groups_run(codec), by_hand(codec)
    for g in range(GROUPS):
        assert ours[g]["step"] == SYNCS
        for sync, (mine, theirs) in enumerate(zip(ours[g]["history"], reference[g], strict=True)):
            where = f"{codec}, group {g}, sync {sync + 1}"
            assert torch.equal(mine["global"], theirs["global"]), where
            assert torch.equal(mine["local"], theirs["local"]), where
            assert mine["residuals"].keys() == theirs["residuals"].keys(), where
            for key, value in mine["residuals"].items():
                assert torch.equal(value, theirs["residuals"][key]), f"{where}, {key}"
    assert all(float(r.abs().max()) > 0 for r in ours[0]["history"][-1]["residuals"].values())


def test_without_error_feedback_the_residual_is_lost_and_the_weights_differ() -> None:
    """The same run with the feedback off keeps no residuals and ends elsewhere: the feedback changes the sums."""
    with_feedback, without = groups_run("int2"), groups_run("int2", error_feedback=False)
    assert without[0]["history"][-1]["residuals"] == {}
    assert not torch.equal(with_feedback[0]["history"][-1]["global"], without[0]["history"][-1]["global"])
    assert torch.equal(without[0]["history"][-1]["global"], without[2]["history"][-1]["global"])


@pytest.mark.parametrize(
    "codec,on", [("int2", True), ("topk", True), ("int4", False), ("bf16", False), ("fp32", False)]
)
def test_error_feedback_is_on_by_default_for_int2_and_topk_only(lighthouse, codec: str, on: bool) -> None:
    """``error_feedback=None`` (``--error-feedback auto``): on where it measured better, for int2 and topk (each
    fragment gets a residual of its size), off otherwise; True and False as asked."""
    from tests.conftest import group_manager_for

    for asked, expected in ((None, on), (False, False), (True, True)):
        if asked is True and codec == "fp32":
            continue  # refused: tests/test_streaming.py
        model = make_model()
        inner, outer = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.7)
        manager = group_manager_for(lighthouse)  # (one outer loop per Manager)
        try:
            diloco = DiLoCo(manager, model, inner, outer, sync_every=2, fragments=2, codec=codec, error_feedback=asked)
            residuals = diloco.rank_state()
            assert bool(residuals) == expected, (codec, asked)
            assert not expected or [r.numel() for r in residuals.values()] == [144, 289]
            diloco.close()
        finally:
            manager.shutdown(wait=False)


# --- residuals are training state: in checkpoints, restored bit for bit -----------------------------------------
EF_ARGS = ["--model", "nano", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "0", "--group-wait", "0"]
EF_ARGS += ["--device", "cpu", "--sync-every", "4", "--fragments", "2", "--codec", "int2"]  # error feedback: auto, on


class Stopped(Exception):
    """The run stops here, as if killed."""


def _trainer(lighthouse: str, folder: Path, outer_steps: int) -> Any:
    from torchx_diloco.config import parse_config
    from torchx_diloco.train import Trainer

    env = {"REPLICA_GROUP_ID": "0", "NUM_REPLICA_GROUPS": "1", "TORCHFT_LIGHTHOUSE": lighthouse}
    args = [*EF_ARGS, "--outer-steps", str(outer_steps), "--checkpoint-dir", str(folder)]
    return Trainer(parse_config(args, env))


def test_a_resume_restores_each_fragments_residual_and_trains_on_bit_for_bit(lighthouse, tmp_path) -> None:
    """One group (one-file checkpoints), int2 with error feedback, two fragments: a run stopped after 3 outer steps
    and resumed ends with the global weights and residuals of an uninterrupted 6-step run, step by step; the
    group's part holds its residuals, the global part none (a healing peer never receives them)."""
    from torchx_diloco._fleet.testing import committed_checksums
    from torchx_diloco.checkpoint import CheckpointStore

    whole = _trainer(lighthouse, tmp_path / "whole", 6)
    assert whole.run() == 0
    first = _trainer(lighthouse, tmp_path / "stopped", 6)  # the same flags (the same lr schedule): stopped at 3
    save = first.checkpointer.save

    def save_then_stop(step: int, *args: Any) -> None:
        save(step, *args)
        if step == 3:
            raise Stopped  # (run() waits for the writer on its way out)

    first.checkpointer.save = save_then_stop  # type: ignore[method-assign]
    with pytest.raises(Stopped):
        first.run()
    saved = CheckpointStore(str(tmp_path / "stopped")).latest(0)
    assert saved.step == 3 and set(saved.group_state["rank_state"]) == {"fragment_0", "fragment_1"}
    assert "rank_state" not in saved.global_state["diloco"] and "residuals" not in saved.global_state["diloco"]
    assert torch.equal(saved.group_state["rank_state"]["fragment_0"], first.diloco.rank_state()["fragment_0"])
    resumed = _trainer(lighthouse, tmp_path / "stopped", 6)
    assert resumed.run() == 0
    ours, reference = committed_checksums(tmp_path / "stopped", 0), committed_checksums(tmp_path / "whole", 0)
    assert [ours[s] for s in (4, 5, 6)] == [reference[s] for s in (4, 5, 6)]
    for key, value in whole.diloco.rank_state().items():
        assert torch.equal(resumed.diloco.rank_state()[key], value) and float(value.abs().max()) > 0


def test_sharded_parts_hold_each_ranks_residuals_and_leave_out_other_sizes(tmp_path) -> None:
    """A DCP group part keeps a rank's residuals under the rank's own key; a rank whose residual has another size
    (another layout of the group) or that has none saved gets nothing loaded, and starts from zeros."""
    from torchx_diloco.checkpoint import dcp

    model = nn.Linear(4, 2)
    inner = torch.optim.AdamW(model.parameters())
    residuals = {"fragment_0": torch.randn(10), "fragment_1": torch.randn(3)}
    url = str(tmp_path / "part")
    dcp.save_sharded(url, dcp.group_state_dict(model, inner, 1, False, rank_state=residuals))
    sizes = dcp.saved_sizes(url)
    assert sizes["rank_state_1.fragment_0"] == (10,) and sizes["rank_state_1.fragment_1"] == (3,)
    into = {"fragment_0": torch.zeros(10), "fragment_1": torch.zeros(4)}  # fragment 1: another size here
    state = dcp.group_state_dict(model, inner, 1, False, sizes, into)
    assert set(state["rank_state_1"]) == {"fragment_0"}
    dcp.load_sharded(url, state)
    assert torch.equal(into["fragment_0"], residuals["fragment_0"]) and not into["fragment_1"].any()
    assert "rank_state_0" not in dcp.group_state_dict(model, inner, 0, False, sizes, into)


@pytest.mark.slow
def test_a_two_rank_group_with_error_feedback_resumes_as_if_never_stopped(tmp_path, faulty_url) -> None:
    """One group of 2 ddp ranks (each sends, and keeps the residual of, its half of the pseudo-gradient; sharded
    checkpoints): a run held at step 3's checkpoint, killed, and resumed ends bit for bit where an uninterrupted
    run ends; each rank's residual is in the part under its own key. With eager outer steps on top
    (``--outer-delay 1``: one run covers both) each rank's starting points and its part of the round in flight
    are there too, and the resumed run sends that again."""
    import json

    from torchx_diloco._fleet.faulty import FAULTS_ENV
    from torchx_diloco._fleet.testing import Group, Lighthouse, committed, metrics_url, read_metrics
    from torchx_diloco.checkpoint import CheckpointStore
    from torchx_diloco.checkpoint.dcp import saved_sizes

    lighthouse = Lighthouse(tmp_path, min_replicas=1, idle_exit=0, extra=["--heartbeat-timeout-ms", "1500"])
    args = [*EF_ARGS[: EF_ARGS.index("--codec")], "--codec", "topk", "--topk-density", "0.05", "--error-feedback", "on"]
    args += ["--outer-steps", "4", "--outer-delay", "1"]
    hold = {FAULTS_ENV: json.dumps([{"match": "step_00000003/", "action": "hold", "until": str(tmp_path / "go")}])}

    def group(ckpt: str, tag: str, faults: Optional[Dict[str, str]] = None) -> Any:
        return Group(0, 1, lighthouse.url, [*args, "--checkpoint-dir", ckpt], tmp_path, faults, tag=tag, nproc=2)

    def weights(folder: Path) -> Dict[int, str]:
        return {r["outer_step"]: r["weights_sha"] for r in committed(read_metrics(metrics_url(folder, 0)))}

    whole = group(str(tmp_path / "whole"), "whole")
    assert whole.wait(120) == 0, whole.output()[-3000:]
    folder = Path(faulty_url.removeprefix("faulty://"))
    first = group(faulty_url, "first", hold)
    deadline = time.monotonic() + 120
    while 2 not in weights(folder):  # step 2's parts and metrics are written; step 3's write waits for "go"
        assert time.monotonic() < deadline and first.proc.poll() is None, first.output()[-3000:]
        time.sleep(0.1)
    first.kill()
    sizes = saved_sizes(CheckpointStore(faulty_url).sharded_url(2, "replica_group_0"))
    halves = [sizes.get(f"rank_state_{r}.fragment_0") for r in (0, 1)]
    assert halves[0] is not None and halves[0] == halves[1], sizes  # each rank's half of fragment 0
    # each rank's whole payload of the round in flight (fragment 0 at step 2), and its starts
    assert all(sizes.get(f"rank_state_{r}.round") == (2 * halves[0][0],) for r in (0, 1)), sizes
    assert all(f"rank_state_{r}.start_1" in sizes for r in (0, 1)), sizes
    second = group(faulty_url, "second")
    assert second.wait(120) == 0, second.output()[-3000:]
    lighthouse.kill()
    assert "group 0 resumed from" in second.output() and "(outer step 2)" in second.output(), second.output()
    assert "starts from zero residuals" not in second.output()
    assert weights(folder)[4] == weights(tmp_path / "whole")[4]
