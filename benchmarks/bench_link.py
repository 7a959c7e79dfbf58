"""Benchmark 2: DiLoCo against data-parallel training over a slow link.

Two replica groups, each in its own network namespace, reach each other and the lighthouse (in a hub
namespace) over veth pairs shaped with ``tc`` tbf (e.g. 100 Mbit/s each way), and over the same veths
unshaped. For the same model and the same tokens it runs data-parallel training (gradients averaged every
step through torchft's Manager: benchmarks/dp_worker.py) and DiLoCo (``python -m torchx_diloco.train``) at
several H, interleaved; Streaming DiLoCo, the codecs and eager outer steps (``--outer-delay 1``) at H=10, each
shaped row beside its unshaped twin (the same flags over the same veths, no shaping): on 2 shared cores a
sync's own CPU work is the floor, so the twin says what the slow link itself costs. Reports per group:
tokens/s, compute utilisation (time in forward/backward/optimizer over wall time) and bytes sent per inner
step, read from the veth's tx_bytes inside the group's namespace, against the codec's payload / H. Needs root
(``ip netns``, ``tc``); this kernel has no netem, so no added delay.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402
from torchx_diloco._fleet import netlab  # noqa: E402

SETTLE_S = 0.2  # > the tx sampling period
DP_WORKER = str(Path(__file__).resolve().parent / "dp_worker.py")
STREAM_P = 5  # fragments of the streaming rows: H=10 must be a multiple of P (P=4 is refused), H/P = 2
STREAM_TAU = 1  # inner steps a fragment's exchange runs behind


def dp_stats(run: bl.Run, cfg: Dict[str, Any], skip: int) -> Dict[str, Any]:
    """Steady state of a data-parallel run: steps after the first ``skip`` (connect, first heal)."""
    per_group = []
    for g, records in enumerate(run.metrics):
        done = [r for r in records if r["committed"]]
        window = done[skip:]
        t0, t1 = done[skip - 1]["time"], window[-1]["time"]
        tx = netlab.bytes_between(run.tx_samples(g), t0, t1)
        per_group.append(
            {
                "tokens_per_s": len(window) * cfg["batch_size"] * cfg["seq_len"] / (t1 - t0),
                "utilisation": sum(r["compute_s"] for r in window) / sum(r["step_s"] for r in window),
                "wait_s_per_inner_step": sum(r["step_s"] - r["compute_s"] for r in window) / len(window),
                "bytes_per_inner_step": tx / len(window) if tx is not None else None,
                "steps_measured": len(window),
            }
        )
    return _mean(per_group)


def diloco_stats(run: bl.Run, cfg: Dict[str, Any], H: int, eager: bool = False) -> Dict[str, Any]:
    """Steady state of a DiLoCo run: the rounds after the first (whose sync also heals the late group).

    ``H`` here is the inner steps per outer step: H/P for Streaming DiLoCo (one record per fragment sync).
    ``eager`` (``--outer-delay 1``, one fragment): a record is written after its step() already sent the next
    round, so the bytes are counted from the start of the first record's step() (the round before it was done a
    window ago). With P fragments a window is H/P steps, too short for that (the round before may still be
    crossing), and one round of the many is 1/P of the model: counted as for the others."""
    per_group = []
    tokens = H * cfg["batch_size"] * cfg["seq_len"]
    for g, records in enumerate(run.metrics):
        done = bl.committed(records)
        window = done[1:]
        windows_s = [tokens / r["tokens_per_s"] for r in window]
        # from just after the first commit to just after the last: the first round's traffic (and heal)
        # is over, the last round's is in, and both ends fall in compute time (no traffic but heartbeats)
        start = done[0]["time"] - done[0]["sync_s"] if eager else done[0]["time"] + SETTLE_S
        tx = netlab.bytes_between(run.tx_samples(g), start, window[-1]["time"] + SETTLE_S)
        per_group.append(
            {
                "tokens_per_s": sum(tokens for _ in window) / sum(windows_s),
                "utilisation": 1 - sum(r["sync_s"] for r in window) / sum(windows_s),
                "wait_s_per_inner_step": sum(r["sync_s"] for r in window) / (H * len(window)),
                "bytes_per_inner_step": tx / (H * len(window)) if tx is not None else None,
                "steps_measured": H * len(window),
                "first_sync_s": done[0]["sync_s"],
            }
        )
    return _mean(per_group)


def expected_bytes(codec: str, params: int, fragments: int) -> float:
    """What a group sends per sync of the whole model with 2 groups: a dense codec's reduce-scatter and all-gather
    send 2(n-1)/n = 1 encoded payload (fp32: the ring all-reduce, the same), topk's all-gather (n-1) = 1 payload;
    the codec's own count, scales and indices included."""
    from torchx_diloco.codecs import get_codec

    wire = get_codec(codec, 0.02 if codec == "topk" else None)
    return fragments * wire.encoded_bytes(-(-params // fragments))


def _mean(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k in rows[0]:
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    out["per_group"] = rows
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the short version (default)")
    p.add_argument("--full", action="store_true", help="more inner steps, H up to 250")
    p.add_argument(
        "--rate",
        action="append",
        default=None,
        help="tbf rate of the shaped link (repeatable; default 100mbit); 'none' = unshaped",
    )
    a = p.parse_args()
    started = time.time()
    why = netlab.available()
    if why:
        print(f"benchmark 2 skipped: {why}")
        bl.write_result("link", {"skipped": why}, started)
        return 0
    if a.full:
        cfg = dict(model="tiny", seq_len=128, batch_size=8, steps=750, H=[10, 50, 250], dp_skip=5)
    else:
        cfg = dict(model="tiny", seq_len=128, batch_size=8, steps=150, H=[10, 50], dp_skip=5)
    rates = a.rate or ["100mbit", "none"]
    # Streaming DiLoCo, the codecs and eager outer steps at H=10: (name, flags, fragments, codec)
    stream = ["--fragments", str(STREAM_P), "--overlap-steps", str(STREAM_TAU)]
    eager = ["--outer-delay", "1"]
    topk = ["--codec", "topk", "--topk-density", "0.02"]
    streaming = [
        ("DiLoCo H=10 int8", ["--codec", "int8"], 1, "int8"),
        ("DiLoCo H=10 int2", ["--codec", "int2"], 1, "int2"),
        ("DiLoCo H=10 topk 2%", topk, 1, "topk"),
        *(
            (f"stream P={STREAM_P} tau={STREAM_TAU} {c}", [*stream, "--codec", c], STREAM_P, c)
            for c in ("fp32", "int8")
        ),
        *((f"eager H=10 {c}", [*eager, "--codec", c], 1, c) for c in ("fp32", "int8", "int2")),
        (f"eager P={STREAM_P} int8", [*eager, "--fragments", str(STREAM_P), "--codec", "int8"], STREAM_P, "int8"),
    ]
    params = bl.model_params(cfg["model"], cfg["seq_len"])
    model_bytes = 4 * params
    common = ["--model", cfg["model"], "--seq-len", str(cfg["seq_len"]), "--batch-size", str(cfg["batch_size"])]
    print(
        f"benchmark 2: DP vs DiLoCo over a shaped link, model {cfg['model']} ({params / 1e6:.2f}M params, "
        f"{model_bytes / 1e6:.1f} MB), 2 groups, {cfg['steps']} inner steps each, links {', '.join(rates)}"
    )

    work = Path(tempfile.mkdtemp(prefix="bench_link-"))
    results: List[Dict[str, Any]] = []
    try:
        with netlab.Lab(2) as lab:
            configs: List[tuple] = [("data-parallel", None, [], 1, "fp32")]
            configs += [(f"DiLoCo H={H}", H, [], 1, "fp32") for H in cfg["H"]]
            configs += [(name, 10, flags, p, codec) for name, flags, p, codec in streaming]
            for name, H, extra, fragments, codec in configs:
                for rate in rates:  # each row shaped, then its unshaped twin
                    lab.shape(None if rate == "none" else rate)
                    tag = f"{rate}-{name.replace(' ', '').replace('=', '')}"
                    if H is None:
                        run = bl.Run(
                            work / tag, 2, [*common, "--steps", str(cfg["steps"])], lab=lab, script=DP_WORKER
                        ).wait(timeout=900)
                        stats = dp_stats(run, cfg, cfg["dp_skip"])
                        expected = model_bytes  # a 2-member ring all-reduce sends the buffer once per step
                    else:
                        outer = cfg["steps"] // H * fragments
                        run = bl.Run(
                            work / tag,
                            2,
                            [
                                *common,
                                "--sync-every",
                                str(H),
                                "--outer-steps",
                                str(outer),
                                "--eval-batches",
                                "0",
                                "--checkpoint-every",
                                "1000000",
                                "--min-replicas",
                                "2",
                                *extra,
                            ],
                            lab=lab,
                        ).wait(timeout=900)
                        one_round_ahead = "--outer-delay" in extra and fragments == 1
                        stats = diloco_stats(run, cfg, H // fragments, eager=one_round_ahead)
                        expected = expected_bytes(codec, params, fragments) / H
                    row = {
                        "link": rate,
                        "method": name,
                        "H": H,
                        "flags": extra,
                        "wall_s": run.wall_s,
                        "expected_bytes_per_inner_step": expected,
                        **stats,
                    }
                    results.append(row)
                    print(
                        f"  {rate:8s} {name:14s} {stats['tokens_per_s']:8.0f} tok/s  util "
                        f"{100 * stats['utilisation']:5.1f}%  {bl.fmt(stats['bytes_per_inner_step'])} B/step  "
                        f"(wall {run.wall_s:.0f}s)"
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results.sort(key=lambda r: (rates.index(r["link"]), 0 if r["H"] is None else r["H"], len(r["flags"])))
    rows = [
        [
            r["link"],
            r["method"],
            r["tokens_per_s"],
            100 * r["utilisation"],
            1e3 * r["wait_s_per_inner_step"],
            r["bytes_per_inner_step"] / 1e3 if r["bytes_per_inner_step"] is not None else None,
            r["expected_bytes_per_inner_step"] / 1e3,
            r["bytes_per_inner_step"] / r["expected_bytes_per_inner_step"] if r["bytes_per_inner_step"] else None,
        ]
        for r in results
    ]
    print(
        bl.table(
            [
                "link",
                "method",
                "tokens/s per group",
                "compute util %",
                "ms waiting per inner step",
                "kB sent per inner step",
                "expected kB (payload+scales)/H",
                "measured / expected",
            ],
            rows,
            digits=2,
        )
    )
    shaped = [r for r in results if r["link"] != "none"]
    goals = {}
    for rate in {r["link"] for r in shaped}:
        dp = next(r for r in shaped if r["link"] == rate and r["H"] is None)
        plain = [r for r in shaped if r["link"] == rate and r["H"] and not r["flags"]]
        best = max(plain, key=lambda r: r["utilisation"])
        goals[f"{rate}: DiLoCo H={best['H']} util >= 90% (DP {100 * dp['utilisation']:.0f}%)"] = (
            best["utilisation"] >= 0.9
        )
        for r in shaped:
            if r["link"] != rate or not r["flags"]:
                continue
            twin = next((t for t in results if t["link"] == "none" and t["method"] == r["method"]), None)
            if "eager" in r["method"] and "fp32" not in r["method"] and twin is not None:
                points = 100 * (twin["utilisation"] - r["utilisation"])
                goals[f"{rate}: {r['method']} util within 2 points of unshaped ({points:+.1f})"] = points <= 2
            if "stream" in r["method"] or "eager" in r["method"]:
                ratio = (r["bytes_per_inner_step"] or 0) / r["expected_bytes_per_inner_step"]
                goals[f"{rate}: {r['method']} bytes within 5% of expected ({ratio:.3f})"] = abs(ratio - 1) <= 0.05
    bl.write_result(
        "link",
        {
            "config": {
                **cfg,
                "params": params,
                "model_bytes": model_bytes,
                "groups": 2,
                "rates": rates,
                "shaping": "tc tbf on both ends of each group's veth (burst 256kb, latency 50ms); no netem",
            },
            "results": results,
            "goals": goals,
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
