"""Benchmark 1: our DiLoCo outer loop against torchft.local_sgd.DiLoCo, everything else identical.

Two replica groups on CPU train the same GPT (preset ``small``, ~10.7M parameters) on the same data with the
same H, once with ``--impl torchx_diloco`` and once with ``--impl torchft``, interleaved (A B B A A B ...).
Reports the median seconds per outer round and per sync (ratios ours/torchft's; goal <= 1.0) and the largest
absolute difference between the two runs' final global weights, read from their checkpoints (goal: float
round-off). Then the same a second time as Streaming DiLoCo (``--fragments 2 --overlap-steps 1``).

``--profile PAIRS`` instead times every inner step's phases (forward/backward, clipping, AdamW, the outer loop's
``step()``) in wall and CPU seconds with the kernel's page faults, from outside the unchanged trainer, in PAIRS
interleaved blocking runs of each (results/vs_torchft-profile.json); ``--malloc-keep`` runs the groups with glibc's
malloc keeping freed memory, which takes the heap's layout out of the comparison (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

IMPLS = ("torchx_diloco", "torchft")
# --malloc-keep: glibc keeps freed memory (fixed thresholds; its dynamic mmap threshold and trimming off), so neither
# side's inner steps page-fault fresh memory because of where its sync happened to leave the heap (see --profile)
MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
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


# --- --profile: where an inner step's time goes, with each implementation ---------------------------------------
PHASES = ("forward_backward", "clip", "before_sync", "adamw", "inner_opt_step", "diloco_step", "loop")


def phase_worker(argv: List[str]) -> int:
    """One replica group of ``python -m torchx_diloco.train ARGV`` with every inner step's phases timed (wall and
    CPU seconds); the steps as JSON lines in the file after ``--out``. Wraps the trainer from outside: its code runs
    unchanged. ``adamw`` is the inner optimizer's own step (between a pre-hook and a post-hook registered before the
    outer loop's: torchft's sync hook is not in it); ``inner_opt_step`` is the whole call (with torchft's hook);
    ``diloco_step`` is ``diloco.step()``; ``loop`` is one turn of the trainer's loop (from one ``diloco.step()``'s
    return to the next's)."""
    import resource

    import torch

    from torchx_diloco import train

    out = Path(argv[argv.index("--out") + 1])
    argv = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
    steps: List[Dict[str, Any]] = []
    current: Dict[str, Any] = {}
    clock = time.perf_counter

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            w, c = clock(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                current[name] = current.get(name, 0.0) + clock() - w
                current[name + "_cpu"] = current.get(name + "_cpu", 0.0) + time.thread_time() - c

        return wrapper

    build = train.build_optimizers

    def build_optimizers(*a: Any, **k: Any) -> Any:
        inner, outer = build(*a, **k)
        mark: Dict[str, float] = {}
        inner.register_step_pre_hook(lambda *_: mark.update(w=clock(), c=time.thread_time()))

        def after(*_: Any) -> None:
            current["adamw"] = clock() - mark["w"]
            current["adamw_cpu"] = time.thread_time() - mark["c"]

        inner.register_step_post_hook(after)  # before the outer loop's hooks (join() builds it later)
        return inner, outer

    train.build_optimizers = build_optimizers
    trainer_cls = train.Trainer
    trainer_cls._accumulate_gradients = timed("forward_backward", trainer_cls._accumulate_gradients)  # type: ignore
    trainer_cls._before_sync = timed("before_sync", trainer_cls._before_sync)  # type: ignore
    torch.nn.utils.clip_grad_norm_ = timed("clip", torch.nn.utils.clip_grad_norm_)
    join = trainer_cls.join
    started = {"w": 0.0, "c": 0.0, "p": 0.0}

    def usage(before: Any, after: Any) -> Dict[str, float]:
        return {
            "involuntary_switches": after.ru_nivcsw - before.ru_nivcsw,
            "minor_page_faults": after.ru_minflt - before.ru_minflt,
            "loop_process_sys": after.ru_stime - before.ru_stime,  # the kernel's part: page faults, mostly
            "loop_process_user": after.ru_utime - before.ru_utime,
        }

    def start_step() -> None:  # a turn of the loop ends where diloco.step() returns: the next one starts there
        started.update(w=clock(), c=time.thread_time(), p=time.process_time())
        started["ru"] = resource.getrusage(resource.RUSAGE_SELF)

    def joined(self: Any) -> None:
        join(self)
        self.inner_opt.step = timed("inner_opt_step", self.inner_opt.step)
        diloco_step = timed("diloco_step", self.diloco.step)
        start_step()

        def step() -> bool:
            committed = diloco_step()
            current.update(
                inner_step=self.progress.inner_steps,
                outer_step=self.manager.current_step(),
                loop=clock() - started["w"],
                loop_cpu=time.thread_time() - started["c"],  # the main thread's
                loop_process_cpu=time.process_time() - started["p"],  # every thread's
                **usage(started["ru"], resource.getrusage(resource.RUSAGE_SELF)),
            )
            steps.append(dict(current))
            current.clear()
            start_step()
            return committed

        self.diloco.step = step

    trainer_cls.join = joined  # type: ignore
    try:
        return train.main(argv)
    finally:
        out.write_text("".join(json.dumps(s) + "\n" for s in steps))


def profile(work: Path, args: List[str], cfg: Dict[str, Any], pairs: int) -> Dict[str, Any]:
    """``pairs`` interleaved runs of each implementation (blocking) with every inner step's phases timed."""
    outer = cfg["outer_steps"]
    args = [*args, "--outer-steps", str(outer)]
    per: Dict[str, Dict[str, List[float]]] = {impl: {} for impl in IMPLS}
    per_run: List[Dict[str, Any]] = []
    for rep in range(pairs):
        for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
            wd = work / f"profile-{impl}-{rep}"
            run = bl.Run(
                wd,
                2,
                ["--phase-worker", *args, "--impl", impl, "--checkpoint-dir", str(wd / "ckpt")],
                script=str(Path(__file__).resolve()),
            ).wait(timeout=900)
            sums: Dict[str, List[float]] = {}
            h = cfg["H"]
            for records in run.metrics:
                for r in records[h:]:  # the first round is warm-up (allocation, the first Gloo connect)
                    if r["inner_step"] % h == 0:
                        continue  # the inner step that syncs: its time is the sync's, reported apart
                    for key, value in r.items():
                        if isinstance(value, (int, float)) and key not in ("inner_step", "outer_step"):
                            per[impl].setdefault(key, []).append(float(value))
                            sums.setdefault(key, []).append(float(value))
            med = {k: bl.median(v) for k, v in sums.items()}
            series = {  # every inner step of group 0, the first round and the syncs included
                key: [r.get(key) for r in run.metrics[0]] for key in ("loop", "minor_page_faults", "diloco_step")
            }
            per_run.append({"impl": impl, "rep": rep, "wall_s": round(run.wall_s, 2), "median": med, "group0": series})
            print(
                f"  profile run {rep} {impl:14s} wall {run.wall_s:6.1f}s  median loop {med['loop']:.4f}s  "
                f"fwd+bwd {med['forward_backward']:.4f}s  adamw {med['adamw']:.4f}s"
            )
    return {"per_step": per, "runs": per_run}


def malloc_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}


def report_profile(
    name: str, result: Dict[str, Any], cfg: Dict[str, Any], args: List[str], params: int, started: float
) -> int:
    per = result["per_step"]
    keys = [
        k
        for k in (
            *PHASES,
            *(f"{p}_cpu" for p in PHASES),
            "loop_process_cpu",
            "loop_process_user",
            "loop_process_sys",
            "minor_page_faults",
            "involuntary_switches",
        )
    ]
    rows = []
    for key in keys:
        ours, theirs = bl.median(per["torchx_diloco"].get(key, [])), bl.median(per["torchft"].get(key, []))
        if ours is None and theirs is None:
            continue
        rows.append([key, ours, theirs, bl.ratio(ours, theirs)])
    print("median per inner step (steps that do not sync, after the first round), seconds:")
    print(bl.table(["phase", "torchx_diloco", "torchft", "ours / torchft"], rows, digits=4))
    loops = {impl: [r["median"]["loop"] for r in result["runs"] if r["impl"] == impl] for impl in IMPLS}
    print("median loop per run: " + "; ".join(f"{impl} {', '.join(f'{x:.4f}' for x in loops[impl])}" for impl in IMPLS))
    bl.write_result(
        name,
        {
            "config": {**cfg, "params": params, "groups": 2, "args": args, "malloc_env": malloc_env()},
            "median_per_inner_step_s": {r[0]: {"torchx_diloco": r[1], "torchft": r[2], "ratio": r[3]} for r in rows},
            "median_loop_per_run_s": loops,
            "runs": result["runs"],
        },
        started,
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the short version (default)")
    p.add_argument("--full", action="store_true", help="longer runs, more repetitions")
    p.add_argument("--reps", type=int, default=None, help="runs per implementation")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="PAIRS",
        help="instead: PAIRS interleaved blocking runs of each with every inner step's phases timed "
        "(results/vs_torchft-profile.json)",
    )
    p.add_argument("--model", default=None, help="another model preset (default: small)")
    p.add_argument(
        "--malloc-keep",
        action="store_true",
        help="run the groups with glibc's malloc keeping freed memory ("
        + " ".join(f"{k}={v}" for k, v in MALLOC_KEEP.items())
        + ")",
    )
    a = p.parse_args()
    if a.malloc_keep:
        os.environ.update(MALLOC_KEEP)  # the groups inherit it (benchlib.group_env)
    started = time.time()
    cfg = (
        dict(model="small", seq_len=128, batch_size=8, H=10, outer_steps=5, reps=3)
        if a.full
        else dict(model="small", seq_len=64, batch_size=4, H=10, outer_steps=4, reps=2)
    )
    if a.reps:
        cfg["reps"] = a.reps
    if a.model:
        cfg["model"] = a.model
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
    if a.profile:
        try:
            name = "vs_torchft-profile-malloc-keep" if a.malloc_keep else "vs_torchft-profile"
            return report_profile(name, profile(work, args, cfg, a.profile), cfg, args, params, started)
        finally:
            shutil.rmtree(work, ignore_errors=True)
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
        "vs_torchft-malloc-keep" if a.malloc_keep else "vs_torchft",
        {
            "config": {**cfg, "params": params, "groups": 2, "args": args, "malloc_env": malloc_env()},
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
    if sys.argv[1:2] == ["--phase-worker"]:  # one group of a --profile run (started by profile())
        raise SystemExit(phase_worker(sys.argv[2:]))
    raise SystemExit(main())
