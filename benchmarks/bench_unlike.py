"""Benchmark 8: groups of other speeds. Does a run train at the speed of its groups, not of its slowest one?

Three replica groups of the nano GPT whose inner steps have a floor of ``FAST_S`` seconds, group 2's of twice that
(``torchx_diloco._fleet.models:paced_nano``: the floor sleeps, so three groups on two cores stay at their pace).
Three configurations, run interleaved (``--reps`` rounds of equal, plain, auto):

- ``equal``: all three at the fast pace, H for all (the reference for loss against tokens);
- ``plain``: group 2 at half the pace, H for all: the fast groups wait for it at every sync;
- ``auto``: the same groups with ``--sync-every auto:H``: group 2 takes about H/2 inner steps per outer step (from
  the step times of the round before), and the average is weighted by steps x tokens.

Per group: compute utilisation (1 - the seconds a sync held training up / the window's seconds, over the rounds
after the first); the run's training seconds; its final eval loss and the tokens all groups trained on; and eval
loss against ``equal`` at the same tokens (``equal``'s curve interpolated). Goals (issue 19): every group >= 90%
busy with auto; loss at equal tokens within 1% of equal groups.

A straggler row: three equal groups, group 2's inner step stalls ``STALL_S`` seconds once mid-run, the lighthouse's
straggler grace (join timeout) ``GRACE_S``: the others' longest sync against the stall (goal: about the grace).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

FAST_S = 0.03  # the fast groups' inner step floor; group 2's is twice that
STALL_S, GRACE_S = 30.0, 5.0
MODEL = "torchx_diloco._fleet.models:paced_nano"
COMMON = ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "4", "--group-wait", "30", "--device", "cpu"]


def model_args(step_s: Sequence[float], **more: Any) -> List[str]:
    return ["--model", MODEL, "--model-args", json.dumps({"step_s": list(step_s), **more})]


def run(work: Path, args: Sequence[str], lighthouse_args: Sequence[str] = (), min_replicas: int = 3) -> bl.Run:
    return bl.Run(work, 3, [*COMMON, *args], min_replicas, lighthouse_args=lighthouse_args).wait(timeout=900)


def group_stats(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    done = bl.committed(records)
    rounds = done[1:]  # the first round also waits for every group to start
    seconds = [r["window_steps"] * (r["tokens"] / r["inner_steps"]) / r["tokens_per_s"] for r in rounds]
    return {
        "utilisation": 1 - sum(r["sync_s"] for r in rounds) / sum(seconds),
        "window_steps": sorted({r["window_steps"] for r in rounds}),
        "longest_sync_s": max(r["sync_s"] for r in rounds),
        "train_s": done[-1]["time"] - done[0]["time"],
    }


def loss_curve(metrics: List[List[Dict[str, Any]]]) -> List[tuple]:
    """(tokens all groups trained on, eval loss) after each outer step, from group 0's eval of the global weights."""
    per_group = [{r["outer_step"]: r for r in bl.committed(m)} for m in metrics]
    steps = sorted(set.intersection(*(set(g) for g in per_group)))
    return [(sum(g[s]["tokens"] for g in per_group), per_group[0][s]["eval_loss"]) for s in steps]


def loss_at(curve: List[tuple], tokens: float) -> Optional[float]:
    """``curve``'s loss at ``tokens``, interpolated linearly (None outside it)."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:], strict=False):
        if t0 <= tokens <= t1:
            return l0 + (l1 - l0) * (tokens - t0) / (t1 - t0)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the short version (default)")
    p.add_argument("--full", action="store_true", help="more outer steps and repetitions")
    p.add_argument("--reps", type=int, default=None, help="rounds of the three configurations (quick 2, full 3)")
    p.add_argument("--no-straggler", action="store_true", help="skip the straggler row")
    a = p.parse_args()
    started = time.time()
    H, outer = (20, 20) if a.full else (20, 10)
    reps = a.reps or (3 if a.full else 2)
    configs = {
        "equal": [*model_args([FAST_S] * 3), "--sync-every", str(H)],
        "plain": [*model_args([FAST_S, FAST_S, 2 * FAST_S]), "--sync-every", str(H)],
        "auto": [*model_args([FAST_S, FAST_S, 2 * FAST_S]), "--sync-every", f"auto:{H}"],
    }
    results: Dict[str, List[Dict[str, Any]]] = {name: [] for name in configs}
    work = Path(tempfile.mkdtemp(prefix="bench-unlike-"))
    try:
        for rep in range(reps):
            for name, args in configs.items():
                r = run(work / f"{name}-{rep}", [*args, "--outer-steps", str(outer)])
                curve = loss_curve(r.metrics)
                results[name].append(
                    {"groups": [group_stats(m) for m in r.metrics], "curve": curve, "wall_s": r.wall_s}
                )
                print(f"  rep {rep} {name}: final eval loss {curve[-1][1]:.4f} at {curve[-1][0]} tokens", flush=True)
        straggler = None
        if not a.no_straggler:
            stall_at = 4 * H + H // 2  # mid-window of outer step 5
            # the others train on through the stall and a few outer steps after it, so the straggler comes back
            straggler_steps = 10 + int(STALL_S / (H * FAST_S))
            args = [*model_args([FAST_S] * 3, stall_s=[0, 0, STALL_S], stall_at=stall_at), "--sync-every", str(H)]
            r = run(
                work / "straggler",
                [*args, "--outer-steps", str(straggler_steps), "--min-replicas", "2"],
                ["--join-timeout-ms", str(int(GRACE_S * 1000))],
                min_replicas=2,
            )
            others = [max(x["sync_s"] for x in bl.committed(m)) for m in r.metrics[:2]]
            participants = [x["participants"] for x in bl.committed(r.metrics[0])]
            back = next((i + 1 for i, n in enumerate(participants) if i > 5 and n == 3), None)
            straggler = {"others_longest_sync_s": others, "participants_by_step": participants, "back_at_step": back}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows, summary = [], {}
    for name, reps_ in results.items():
        util = [[rep["groups"][g]["utilisation"] for rep in reps_] for g in range(3)]
        loss_vs_equal = []
        for rep, ref in zip(reps_, results["equal"], strict=True):
            tokens, loss = rep["curve"][-1]
            ref_loss = loss_at(ref["curve"], tokens)
            loss_vs_equal.append(loss / ref_loss - 1 if ref_loss else None)
        summary[name] = {
            "utilisation_median": [bl.median(u) for u in util],
            "train_s_median": bl.median(max(g["train_s"] for g in rep["groups"]) for rep in reps_),
            "final_eval_loss_median": bl.median(rep["curve"][-1][1] for rep in reps_),
            "tokens": reps_[0]["curve"][-1][0],
            "window_steps": [reps_[0]["groups"][g]["window_steps"] for g in range(3)],
            "loss_vs_equal_at_equal_tokens_median": bl.median(loss_vs_equal),
        }
        s = summary[name]
        rows.append(
            [
                name,
                *(100 * u for u in s["utilisation_median"]),
                "/".join(",".join(map(str, w)) for w in s["window_steps"]),
                s["train_s_median"],
                s["tokens"],
                s["final_eval_loss_median"],
                100 * s["loss_vs_equal_at_equal_tokens_median"] if s["loss_vs_equal_at_equal_tokens_median"] else 0.0,
            ]
        )
    headers = [
        "run",
        "util g0 %",
        "util g1 %",
        "util g2 %",
        "H per group",
        "train s",
        "tokens",
        "eval loss",
        "vs equal %",
    ]
    print(
        f"\nthree groups, group 2 half as fast (inner step floors {FAST_S}/{FAST_S}/{2 * FAST_S} s), H={H}, "
        f"{outer} outer steps, medians of {reps}:"
    )
    print(bl.table(headers, rows, digits=3))
    goals = {
        "auto: every group >= 90% busy": all(u >= 0.9 for u in summary["auto"]["utilisation_median"]),
        "auto: eval loss within 1% of equal groups at equal tokens": abs(
            summary["auto"]["loss_vs_equal_at_equal_tokens_median"]
        )
        <= 0.01,
    }
    if straggler is not None:
        longest = max(straggler["others_longest_sync_s"])
        print(
            f"\nstraggler: group 2 stalls {STALL_S:g} s once, grace {GRACE_S:g} s: the others' longest sync "
            f"{longest:.1f} s; 2 participants from outer step 5, all 3 again from {straggler['back_at_step']}"
        )
        goals[f"straggler: the others wait about the grace ({GRACE_S:g} s), not the stall"] = longest < GRACE_S + 5
        goals["straggler: it heals and syncs with the others again"] = straggler["back_at_step"] is not None
    for goal, ok in goals.items():
        print(f"  {'met' if ok else 'NOT met'}: {goal}")
    bl.write_result(
        "unlike",
        {
            "config": {
                "H": H,
                "outer_steps": outer,
                "reps": reps,
                "fast_step_s": FAST_S,
                "stall_s": STALL_S,
                "grace_s": GRACE_S,
            },
            "summary": summary,
            "straggler": straggler,
            "runs": results,
            "goals": goals,
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
