"""Benchmark 1: our DiLoCo outer loop against torchft.local_sgd.DiLoCo, everything else identical.

Two replica groups on CPU train the same GPT (preset ``small``, ~10.7M parameters) on the same data with the
same H, once with ``--impl torchx_diloco`` and once with ``--impl torchft``, interleaved (A B B A A B ...).
Reports the median seconds per outer round and per sync (ratios ours/torchft's; goal <= 1.0) and the largest
absolute difference between the two runs' final global weights, read from their checkpoints (goal: float
round-off).
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

IMPLS = ("torchx_diloco", "torchft")
STREAM_P = 2  # fragments of the streaming comparison


def final_global_weights(ckpt: Path, step: int):
    from torchx_diloco.checkpoint import CheckpointStore

    return CheckpointStore(str(ckpt)).read_part(step, "global")["diloco"]["global_weights"]


def max_abs_diff(a, b) -> float:
    assert set(a) == set(b), "the two runs saved different parameter names"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def compare(work: Path, args: List[str], cfg: Dict[str, Any], fragments: int) -> tuple:
    """``cfg['reps']`` runs of each implementation, interleaved; per-round and per-sync seconds, the final
    weights' largest difference per pair of runs, and the runs."""
    outer = cfg["outer_steps"] * fragments
    args = [*args, "--outer-steps", str(outer)]
    rounds: Dict[str, List[float]] = {impl: [] for impl in IMPLS}
    syncs: Dict[str, List[float]] = {impl: [] for impl in IMPLS}
    diffs, runs = [], []
    tag = f"p{fragments}"
    for rep in range(cfg["reps"]):
        finals = {}
        for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:  # A B, B A, ...: no side always goes first
            run = bl.Run(work / f"{impl}-{tag}-{rep}", 2, [*args, "--impl", impl]).wait(timeout=900)
            tokens = cfg["H"] // fragments * cfg["batch_size"] * cfg["seq_len"]
            shas = set()
            for g, records in enumerate(run.metrics):
                done = bl.committed(records)
                assert len(done) == outer, f"{impl} group {g}: {len(done)} commits"
                for r in done[fragments:]:  # the first round(s) include warm-up (allocation, first Gloo connect)
                    rounds[impl].append(tokens / r["tokens_per_s"])
                    syncs[impl].append(r["sync_s"])
                shas.add(done[-1]["weights_sha"])
            finals[impl] = final_global_weights(run.workdir / "ckpt", outer)
            runs.append({"impl": impl, "rep": rep, "wall_s": round(run.wall_s, 2), "groups_agree": len(shas) == 1})
            print(f"  {tag} run {rep} {impl:14s} wall {run.wall_s:6.1f}s  groups agree: {len(shas) == 1}")
        diffs.append(max_abs_diff(finals["torchx_diloco"], finals["torchft"]))
    return rounds, syncs, diffs, runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the short version (default)")
    p.add_argument("--full", action="store_true", help="longer runs, more repetitions")
    p.add_argument("--reps", type=int, default=None, help="runs per implementation")
    a = p.parse_args()
    started = time.time()
    cfg = (
        dict(model="small", seq_len=128, batch_size=8, H=10, outer_steps=5, reps=3)
        if a.full
        else dict(model="small", seq_len=64, batch_size=4, H=10, outer_steps=4, reps=2)
    )
    if a.reps:
        cfg["reps"] = a.reps
    args = [
        "--model",
        cfg["model"],
        "--seq-len",
        str(cfg["seq_len"]),
        "--batch-size",
        str(cfg["batch_size"]),
        "--sync-every",
        str(cfg["H"]),
        "--eval-batches",
        "0",
        "--checkpoint-every",
        "1000000",
        "--min-replicas",
        "2",
        "--seed",
        "1",
    ]
    params = bl.model_params(cfg["model"], cfg["seq_len"])
    print(
        f"benchmark 1: torchx_diloco vs torchft DiLoCo, model {cfg['model']} ({params / 1e6:.1f}M params), "
        f"2 groups, H={cfg['H']}, {cfg['outer_steps']} outer steps, {cfg['reps']} runs each, interleaved"
    )

    work = Path(tempfile.mkdtemp(prefix="bench_vs_torchft-"))
    try:
        rounds, syncs, diffs, runs = compare(work, args, cfg, fragments=1)
        # Streaming DiLoCo: 2 fragments, each sync overlapped with one inner step (fp32: torchft's own path)
        streaming = ["--fragments", str(STREAM_P), "--overlap-steps", "1"]
        s_rounds, s_syncs, s_diffs, s_runs = compare(work, [*args, *streaming], cfg, fragments=STREAM_P)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s_med = {impl: (bl.median(s_rounds[impl]), bl.median(s_syncs[impl])) for impl in IMPLS}
    print(f"streaming P={STREAM_P} tau=1:")
    print(
        bl.table(
            ["", "torchx_diloco", "torchft", "ours / torchft"],
            [
                [
                    "seconds per fragment round (median)",
                    s_med["torchx_diloco"][0],
                    s_med["torchft"][0],
                    bl.ratio(s_med["torchx_diloco"][0], s_med["torchft"][0]),
                ],
                [
                    "seconds stalled per sync (median)",
                    s_med["torchx_diloco"][1],
                    s_med["torchft"][1],
                    bl.ratio(s_med["torchx_diloco"][1], s_med["torchft"][1]),
                ],
            ],
        )
    )
    print(f"streaming: max |global weights ours - torchft's|: {', '.join(f'{d:.2e}' for d in s_diffs)}")
    streaming_result = {
        "flags": streaming,
        "median_round_s": {impl: s_med[impl][0] for impl in IMPLS},
        "median_sync_s": {impl: s_med[impl][1] for impl in IMPLS},
        "round_ratio": bl.ratio(s_med["torchx_diloco"][0], s_med["torchft"][0]),
        "max_abs_weight_diff": s_diffs,
        "runs": s_runs,
    }

    med = {impl: (bl.median(rounds[impl]), bl.median(syncs[impl])) for impl in IMPLS}
    rows = [
        [
            "seconds per outer round (median)",
            med["torchx_diloco"][0],
            med["torchft"][0],
            bl.ratio(med["torchx_diloco"][0], med["torchft"][0]),
        ],
        [
            "seconds per sync (median)",
            med["torchx_diloco"][1],
            med["torchft"][1],
            bl.ratio(med["torchx_diloco"][1], med["torchft"][1]),
        ],
    ]
    print(bl.table(["", "torchx_diloco", "torchft", "ours / torchft"], rows))
    print(
        f"max |global weights ours - torchft's| after {cfg['outer_steps']} outer steps: "
        f"{', '.join(f'{d:.2e}' for d in diffs)}"
    )
    bl.write_result(
        "vs_torchft",
        {
            "config": {**cfg, "params": params, "groups": 2, "args": args},
            "seconds_per_round": {impl: rounds[impl] for impl in IMPLS},
            "seconds_per_sync": {impl: syncs[impl] for impl in IMPLS},
            "median_round_s": {impl: med[impl][0] for impl in IMPLS},
            "median_sync_s": {impl: med[impl][1] for impl in IMPLS},
            "round_ratio": rows[0][3],
            "sync_ratio": rows[1][3],
            "max_abs_weight_diff": diffs,
            "runs": runs,
            "streaming": streaming_result,
            "goals": {
                "streaming_weights_within_1e-5": max(s_diffs) <= 1e-5,
                "round_ratio<=1": rows[0][3] is not None and rows[0][3] <= 1.0,
                "sync_ratio<=1": rows[1][3] is not None and rows[1][3] <= 1.0,
                "weights_within_1e-5": max(diffs) <= 1e-5,
            },
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
