"""Streaming DiLoCo and the codecs, two or three groups in one process (threads), real lighthouse and Managers.

The oracle is ``torchft.local_sgd.DiLoCo``: with ``codec="fp32"`` our global and local weights must equal
its own after several outer steps, for every fragment count, overlap and mix in the issue's grid.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn

torchft = pytest.importorskip("torchft")
from torchft.local_sgd import DiLoCo as TorchftDiLoCo  # noqa: E402

from tests.conftest import run_in_groups  # noqa: E402
from torchx_diloco.codecs import BLOCK, CODEC_TABLE, TOPK_CHUNK, Feedback, allreduce_sum, get_codec  # noqa: E402
from torchx_diloco.diloco import DiLoCo  # noqa: E402
from torchx_diloco.errors import UserError  # noqa: E402
from torchx_diloco.fragment import split_evenly  # noqa: E402

H = 12  # divisible by P in 1, 2, 4 with H/P > tau for tau up to 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def data_of(group: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + group)
    x = torch.randn(64, 8, generator=g)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def train(
    impl: str,
    fragments: int,
    tau: int,
    alpha: float,
    steps: int,
    codec: str = "fp32",
    groups: int = 2,
    **options: Any,  # DiLoCo's error_feedback, topk_density
) -> List[Dict[str, torch.Tensor]]:
    """Each group's global and local weights after ``steps`` inner steps of ``impl``."""
    models = [make_model() for _ in range(groups)]

    def work(g: int, manager: Any) -> Dict[str, torch.Tensor]:
        model = models[g]
        x, y = data_of(g)
        params = list(model.parameters())
        inner = torch.optim.AdamW(params, lr=0.01)
        parts = split_evenly([p.numel() for p in params], fragments)
        modules = [nn.ParameterList([params[i] for i in part]) for part in parts]
        outers = [torch.optim.SGD(m.parameters(), lr=0.7, momentum=0.9, nesterov=True) for m in modules]
        if impl == "torchft":
            diloco: Any = TorchftDiLoCo(
                manager, modules, inner, outers, sync_every=H, fragment_sync_delay=tau, fragment_update_alpha=alpha
            )
            diloco.__enter__()
        else:
            diloco = DiLoCo(
                manager, model, inner, outers, sync_every=H, fragments=modules, overlap_steps=tau, mix_alpha=alpha,
                codec=codec, **options,
            )  # fmt: skip
        for _ in range(steps):
            ((model(x) - y) ** 2).mean().backward()
            inner.step()
            inner.zero_grad()
            if impl != "torchft":
                diloco.step()
        if impl == "torchft":
            diloco.__exit__(None, None, None)
            global_weights = [t for f in diloco._fragments for t in f.original_parameters.values()]
        else:
            diloco.close()
            global_weights = diloco.global_weights()
        return {
            "global": torch.cat([t.reshape(-1) for t in global_weights]),
            "local": torch.cat([p.detach().reshape(-1) for p in params]),
            "step": torch.tensor(manager.current_step()),
        }

    return run_in_groups(groups, work)


GRID = [(p, tau, alpha) for p in (1, 2, 4) for tau in (0, 1, 2) for alpha in (0.0, 0.5)] + [(2, 1, 0.25)]


@pytest.mark.parametrize("fragments,tau,alpha", GRID, ids=[f"P{p}-tau{t}-alpha{a}" for p, t, a in GRID])
def test_same_weights_as_torchft_streaming_diloco(fragments: int, tau: int, alpha: float) -> None:
    """Two groups, nothing failing, 2 H inner steps (2P outer steps): ours equals torchft's, globally and locally."""
    steps = 2 * H + H // fragments // 2  # ends mid-interval: the local weights carry un-synced progress
    theirs = train("torchft", fragments, tau, alpha, steps)
    ours = train("torchx_diloco", fragments, tau, alpha, steps)
    for g in range(2):
        assert int(ours[g]["step"]) == int(theirs[g]["step"]) == 2 * fragments
        torch.testing.assert_close(ours[g]["global"], theirs[g]["global"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[g]["local"], theirs[g]["local"], rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[0]["global"], ours[1]["global"])  # one set of global weights
    assert not torch.equal(ours[0]["local"], ours[1]["local"])  # trained on their own data since the last sync
    initial = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])
    assert not torch.allclose(ours[0]["global"], initial)  # the outer steps did move the weights


LOW_BIT = [("bf16", {}), ("int8", {}), ("int4", {}), ("int2", {"error_feedback": False}), ("int2", {})]
LOW_BIT += [("topk", {"topk_density": 0.05, "error_feedback": False}), ("topk", {"topk_density": 0.05})]


@pytest.mark.parametrize(
    "codec,options", LOW_BIT, ids=[f"{c}{'' if o.get('error_feedback', True) else '-no-ef'}" for c, o in LOW_BIT]
)
def test_low_bit_syncs_give_every_group_the_same_weights_close_to_fp32(codec: str, options: Dict[str, Any]) -> None:
    """Three groups (chunks of unequal owners), streaming and overlap on: bit-identical global weights in every
    group, near the fp32 run's; the nearer the more bits."""
    exact = train("torchx_diloco", 2, 1, 0.0, 2 * H, groups=3)
    low = train("torchx_diloco", 2, 1, 0.0, 2 * H, codec=codec, groups=3, **options)
    assert torch.equal(low[0]["global"], low[1]["global"]) and torch.equal(low[1]["global"], low[2]["global"])
    error = (low[0]["global"] - exact[0]["global"]).abs().max().item()
    moved = (exact[0]["global"] - torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])).abs().max()
    bound = {"bf16": 0.02, "int8": 0.02, "int4": 0.25, "int2": 0.6, "topk": 0.45}[codec]
    bound *= {"int2": 0.85, "topk": 0.7}.get(codec, 1.0) if options.get("error_feedback", True) else 1.0  # (on)
    assert 0 < error < bound * float(moved), f"{codec}: {error} vs the {float(moved)} the weights moved"


def test_codec_round_trip_errors_and_sizes() -> None:
    """Per-block scales: each value's error is at most half a step of its own block; an outlier coarsens only
    its block; int4 packs two values a byte."""
    torch.manual_seed(0)
    x = torch.randn(4 * BLOCK) * 1e-3
    x[5] = 10.0  # one outlier in the first block
    for name, qmax in (("int8", 127), ("int4", 7)):
        codec = get_codec(name)
        y = codec.round_trip(x)
        blocks, errors = x.view(-1, BLOCK), (y - x).view(-1, BLOCK).abs()
        steps = blocks.abs().amax(dim=1) / qmax
        assert bool((errors <= steps[:, None] / 2 + 1e-9).all())
        assert float(errors[1:].max()) < 1e-3 / qmax * 4 + 1e-9  # the other blocks keep their own fine scale
        assert codec.encoded_bytes(x.numel()) == x.numel() * codec.bits // 8 + 4 * (x.numel() // BLOCK)
        assert codec.encode(x).numel() == codec.encoded_bytes(x.numel())
    assert get_codec("int4").encode(x).numel() == x.numel() // 2 + 4 * 4
    assert torch.equal(get_codec("fp32").round_trip(x), x)
    assert torch.equal(get_codec("bf16").round_trip(x), x.to(torch.bfloat16).float())
    zeros = torch.zeros(3 * BLOCK + 5)
    for codec in CODEC_TABLE.values():
        assert torch.equal(codec.round_trip(zeros), zeros)  # a healed group's zeros stay zeros
    with pytest.raises(ValueError, match="unknown codec 'int3'"):
        get_codec("int3")


def test_int2_sends_a_sign_and_one_of_two_magnitudes_per_block_four_values_a_byte() -> None:
    """A block's magnitudes are the means of its values' magnitudes below and at-or-above their mean (bf16); an
    outlier takes its block's high level alone, and the other blocks keep their own."""
    torch.manual_seed(0)
    x = torch.randn(4 * BLOCK) * 1e-3
    x[5] = 10.0
    codec = get_codec("int2")
    y = codec.round_trip(x)
    assert codec.encode(x).numel() == codec.encoded_bytes(x.numel()) == x.numel() // 4 + 4 * 4
    for block, out in zip(x.view(-1, BLOCK), y.view(-1, BLOCK), strict=True):
        magnitude = block.abs()
        high = magnitude >= magnitude.mean()
        levels = torch.stack([magnitude[~high].mean(), magnitude[high].mean()]).to(torch.bfloat16).float()
        torch.testing.assert_close(out, torch.where(high, levels[1], levels[0]) * torch.sign(block))
    assert float(y[5]) == pytest.approx(10.0, rel=1e-2) and float(y[BLOCK:].abs().max()) < 1e-2
    assert torch.equal(codec.round_trip(torch.zeros(BLOCK + 3)), torch.zeros(BLOCK + 3))


def test_topk_keeps_each_chunks_largest_values_their_indices_and_two_magnitudes() -> None:
    """Per chunk of TOPK_CHUNK values: exactly the k largest magnitudes survive, at their own indices (the last
    index of a chunk too: 12 bits), with their signs and one of the chunk's two magnitudes; the rest are zeros.
    The payload is what the formula says (padded to 4 bytes), and twice the density keeps twice the values."""
    torch.manual_seed(0)
    x = torch.randn(3 * TOPK_CHUNK + 100)  # padded to 4 chunks
    x[TOPK_CHUNK - 1] = 50.0
    codec = get_codec("topk", 0.01)
    k = round(0.01 * TOPK_CHUNK)
    y = codec.round_trip(x)
    padded = torch.cat([x, x.new_zeros(-x.numel() % TOPK_CHUNK)])
    received = torch.cat([y, y.new_zeros(padded.numel() - y.numel())])
    for c, (chunk, out) in enumerate(zip(padded.split(TOPK_CHUNK), received.split(TOPK_CHUNK), strict=True)):
        kept = set(torch.nonzero(out).view(-1).tolist())
        if c < 3:
            assert kept == set(chunk.abs().topk(k).indices.tolist())
        assert torch.equal(torch.sign(out[list(kept)]), torch.sign(chunk[list(kept)]))
        assert len(set(out[list(kept)].abs().tolist())) <= 2
    assert float(y[TOPK_CHUNK - 1]) > 10
    kept_values = 4 * k
    expected = 4 * 4 + 3 * ((kept_values + 1) // 2) + (kept_values + 3) // 4
    assert codec.encode(padded).numel() == codec.encoded_bytes(padded.numel()) == expected + -expected % 4
    assert int((get_codec("topk", 0.02).round_trip(x) != 0).sum()) == 2 * int((y != 0).sum())
    assert torch.equal(codec.round_trip(torch.zeros(TOPK_CHUNK + 1)), torch.zeros(TOPK_CHUNK + 1))


def test_topk_sum_is_an_all_gather_of_every_groups_payload() -> None:
    """Three members: each gets the fp32 sum of every member's decoded payload, bit-identical, and sends (n-1)
    times its payload; with feedback, the residual left is exactly the payload minus what it sent."""
    numel, codec = 2 * TOPK_CHUNK + 7, get_codec("topk", 0.03)

    def work(g: int, manager: Any) -> Tuple[torch.Tensor, int, torch.Tensor, bool]:
        manager.register_state_dict_fn("none", lambda state: None, dict)
        manager.start_quorum()
        payload = torch.randn(numel, generator=torch.Generator().manual_seed(g))
        feedback = Feedback(torch.full((numel,), 0.01), torch.empty(numel))
        sent = allreduce_sum(manager, payload, codec, feedback)
        return payload, sent, feedback.left, manager.should_commit()

    results = run_in_groups(3, work)
    meant = [torch.randn(numel, generator=torch.Generator().manual_seed(g)) + 0.01 for g in range(3)]
    decoded = [codec.round_trip(x) for x in meant]
    total = torch.zeros(numel)
    for d in decoded:  # in rank order, in fp32
        total += d
    payload_bytes = codec.encoded_bytes(3 * TOPK_CHUNK)
    for g, (payload, sent, left, committed) in enumerate(results):
        assert committed and torch.equal(payload, total)
        assert sent == 2 * payload_bytes
        assert torch.equal(left, meant[g] - decoded[g])
    assert payload_bytes < 0.06 * 3 * TOPK_CHUNK  # under half a bit a value at 3%: 16-bit values would be 1.5


@pytest.mark.parametrize(
    "codec,collective",
    [("int2", "alltoall_base"), ("topk", "allgather_into_tensor_coalesced"), ("int2", "allreduce")],
    ids=["int2-payload", "topk-payload", "header"],
)
def test_a_failed_collective_drops_the_round_and_keeps_weights_and_residuals(codec: str, collective: str) -> None:
    """Error feedback on, three groups: a sync commits, then group 2's process group fails inside the payload's
    collective, or the header's sum (aborted, as a broken link, leaving what a half-done sum may leave: no sum):
    no group commits the next round, every group keeps its global weights and its residuals, and says it sent
    nothing; the groups' global weights stay identical. A failed header is never read as groups of other layouts
    (chaos: a peer killed mid-sum ended the run with that error). A member whose collective failed closes its
    process group: the peers waiting on it fail at once, none waits out its collective timeout (in a ring
    all-gather, the member after the failed one waited for a live peer that had stopped sending)."""
    models = [make_model() for _ in range(3)]

    def work(g: int, manager: Any) -> Dict[str, Any]:
        model = models[g]
        errors: List[str] = []
        report = manager.report_error
        manager.report_error = lambda e: (errors.append(str(e)), report(e))  # type: ignore[method-assign]
        x, y = data_of(g)
        inner, outer = torch.optim.AdamW(model.parameters(), lr=0.01), torch.optim.SGD(model.parameters(), lr=0.7)
        diloco = DiLoCo(manager, model, inner, outer, sync_every=3, codec=codec, error_feedback=True)

        def train(steps: int) -> bool:
            committed = False
            for _ in range(steps):
                ((model(x) - y) ** 2).mean().backward()
                inner.step()
                inner.zero_grad()
                committed = diloco.step()
            return committed

        assert train(3)
        before = {"global": [t.clone() for t in diloco.global_weights()], "residuals": dict(diloco.rank_state())}
        if g == 2:
            pg = manager._pg

            def broken(*args: Any, **kwargs: Any) -> Any:
                for t in args[0] if isinstance(args[0], list) else []:
                    t.fill_(12345.0)  # not a sum of anything
                pg.abort()
                raise RuntimeError("link down")

            setattr(pg, collective, broken)
        committed = train(3)
        sent = diloco.last_sync["sent_bytes"]
        after = {"global": [t.clone() for t in diloco.global_weights()], "residuals": dict(diloco.rank_state())}
        if g == 2:
            delattr(pg, collective)  # the link is back
        recovered = train(3)  # the next quorum reconfigures the closed process groups
        diloco.close()
        final = {"global": [t.clone() for t in diloco.global_weights()]}
        return dict(committed=committed, sent=sent, errors=errors, recovered=recovered, before=before, after=after,
                    final=final)  # fmt: skip

    results = run_in_groups(3, work)
    for r in results:
        assert not r["committed"] and r["sent"] == 0
        assert not any("timed out" in e.lower() or "timeout" in e.lower() for e in r["errors"]), r["errors"]
        assert all(torch.equal(a, b) for a, b in zip(r["after"]["global"], r["before"]["global"], strict=True))
        assert r["after"]["residuals"] == r["before"]["residuals"]  # the very tensors: not replaced
        assert all(float(t.abs().max()) > 0 for t in r["before"]["residuals"].values())
        assert r["recovered"], "the round after the failed one commits"
    for when in ("before", "final"):  # the groups' global weights are identical before the failure and after it
        for r in results[1:]:
            pairs = zip(results[0][when]["global"], r[when]["global"], strict=True)
            assert all(torch.equal(a, b) for a, b in pairs), when


@pytest.mark.parametrize("codec", ["int8", "int4", "int2", "fp32"])
def test_sum_is_a_reduce_scatter_not_an_all_gather_of_everything(codec: str) -> None:
    """Three members: every member gets the same sum, within the codec's error, and sends 2 (n-1)/n of the
    encoded payload (an all-gather of everything would send n-1 times it)."""
    numel = 10 * BLOCK + 7  # not a multiple of members x BLOCK: padded

    def work(g: int, manager: Any) -> Tuple[torch.Tensor, int, bool]:
        manager.register_state_dict_fn("none", lambda state: None, dict)  # step 0 heals: something to send
        manager.start_quorum()
        payload = torch.randn(numel, generator=torch.Generator().manual_seed(g))
        sent = allreduce_sum(manager, payload, get_codec(codec))
        return payload, sent, manager.should_commit()

    results = run_in_groups(3, work)
    inputs = [torch.randn(numel, generator=torch.Generator().manual_seed(g)) for g in range(3)]
    exact = sum(inputs)
    # each member's values are off by at most half a step of their block, and so is the encoded sum
    qmax = {"int8": 127, "int4": 7, "int2": 1, "fp32": 1e7}[codec]  # (int2: a loose bound, not its own)
    first = sum(float(x.abs().max()) for x in inputs) / (2 * qmax)
    tolerance = first + (float(exact.abs().max()) + first) / (2 * qmax)
    for payload, sent, committed in results:
        assert committed and sent == results[0][1]
        assert torch.equal(payload, results[0][0])
        assert 0 < float((payload - exact).abs().max()) <= tolerance or codec == "fp32"
        torch.testing.assert_close(payload, exact, rtol=0, atol=tolerance + 1e-5)
    padded = -(-numel // (3 * BLOCK)) * 3 * BLOCK
    expected = (
        2 * 2 * get_codec(codec).encoded_bytes(padded // 3) if codec != "fp32" else 2 * 2 * numel * 4 // 3
    )  # fmt: skip
    assert results[0][1] == expected
    assert expected < 2 * get_codec(codec).encoded_bytes(padded) * 0.7 or codec == "fp32"


def test_fragments_split_in_module_order_into_about_equal_parts() -> None:
    sizes = [128, 16, 256, 16, 16, 1]
    parts = split_evenly(sizes, 2)
    assert [list(p) for p in parts] == [[0, 1], [2, 3, 4, 5]]
    assert [len(p) for p in split_evenly(sizes, 6)] == [1] * 6
    with pytest.raises(ValueError, match="exceeds the model's 6"):
        split_evenly(sizes, 7)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sync_every": 10, "fragments": 4}, "not a multiple of fragments 4"),
        ({"sync_every": 8, "fragments": 4, "overlap_steps": 2}, "overlap_steps 2 must be below H/P = 2"),
        ({"sync_every": 8, "mix_alpha": 1.5}, "mix_alpha 1.5 must be in"),
        ({"sync_every": 8, "codec": "fp8"}, "unknown codec 'fp8'"),
        # the values as given: a negative number or a dash in a name is not rewritten
        ({"sync_every": 8, "overlap_steps": -1}, r"^overlap_steps -1 must be below H/P = 8 .* raise sync_every$"),
        ({"sync_every": 8, "mix_alpha": -0.5}, r"^mix_alpha -0\.5 must be in \[0, 1\]$"),
        ({"sync_every": 8, "codec": "fp-16"}, r"^unknown codec 'fp-16': use one of fp32, "),
        ({"sync_every": 8, "codec": "int2", "topk_density": 0.01}, r"^topk_density applies to codec topk only"),
        ({"sync_every": 8, "codec": "topk", "topk_density": 1.5}, r"^topk_density 1\.5 must be in \(0, 1\]$"),
        ({"sync_every": 8, "error_feedback": True}, r"^error_feedback needs a lossy codec \(fp32 sends every bit\)"),
        ({"sync_every": 8, "outer_delay": 2}, r"^outer_delay 2 is not supported: pass 0 .* or 1 \(eager\)$"),
        (
            {"sync_every": 8, "outer_delay": 1, "overlap_steps": 1},
            r"^outer_delay 1 already overlaps .*: drop overlap_steps$",
        ),
        ({"sync_every": 8, "outer_delay": 1, "mix_alpha": 0.5}, r"^outer_delay 1 leaves the local .*: drop mix_alpha$"),
    ],
)
def test_bad_streaming_settings_fail_with_one_line(kwargs: Dict[str, Any], message: str) -> None:
    model = make_model()
    inner, outer = torch.optim.AdamW(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.7)
    with pytest.raises(ValueError, match=message):
        DiLoCo(object(), model, inner, outer, **kwargs)


DIFFERING = [
    [{"fragments": 1}, {"fragments": 2}],
    [{"codec": "int2"}, {"codec": "topk"}],
    [{"codec": "topk", "topk_density": 0.01}, {"codec": "topk", "topk_density": 0.03}],
]


@pytest.mark.parametrize("layouts", DIFFERING, ids=["fragments", "int2-topk", "densities"])
def test_groups_with_different_layouts_are_refused_not_mixed(layouts: List[Dict[str, Any]]) -> None:
    """Groups with other fragments, codecs or top-k densities: the header tells them apart before any payload
    moves, and each group stops with the one line naming the flags."""
    models = [make_model() for _ in range(2)]

    def work(g: int, manager: Any) -> str:
        model = models[g]
        inner, outer = torch.optim.AdamW(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.7)
        diloco = DiLoCo(manager, model, inner, outer, sync_every=4, **layouts[g])
        try:
            diloco.sync()
        except UserError as e:
            return str(e)
        return "synced"

    for message in run_in_groups(2, work):
        assert "sync different layouts" in message
