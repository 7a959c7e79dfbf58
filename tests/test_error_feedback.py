"""Error feedback, three groups in one process (threads), real lighthouse and Managers.

The reference is the math done by hand with plain tensors: each group's pseudo-gradient plus its residual, cut
into the chunks the reduce-scatter sends (or the whole payload, for topk's all-gather), each encoded and decoded
with the codec's own functions, the owners' fp32 sums in rank order re-encoded, the outer Nesterov step, and the
residual each group keeps: what it meant to send minus what its own encoded chunks decode to. The groups run the
real ``DiLoCo`` through real Managers; both must agree bit for bit over several syncs of two fragments.
"""

from __future__ import annotations

from typing import Any, Dict, List

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
                    "residuals": {k: v.clone() for k, v in diloco.residuals().items()},
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
