"""Benchmark 3: learning quality at equal tokens on the default corpus (pydoc).

Four ways to spend the same tokens: one group with a 4x batch, data-parallel over 4 groups (gradients
averaged every step through torchft: benchmarks/dp_worker.py), and DiLoCo over 4 groups
(``python -m torchx_diloco.train``) at H=10 and H=50. All use the same model, AdamW and learning-rate
schedule, and are evaluated on the same held-out windows. Reports the final eval loss and the bytes each
group sends (computed for a ring all-reduce: 2(n-1)/n x buffer per all-reduce; benchmark 2 measures the
n=2 case on a real link), and draws eval loss against tokens to benchmarks/results/loss_vs_tokens.png and the
final eval loss against the bytes sent (the frontier) to benchmarks/results/loss_vs_bytes.png. ``--full``: the
long version (4000 inner steps, the rows of issue 18), meant to be run once and committed; each finished row is
kept in benchmarks/results/quality-full-rows.json, so a run that is stopped goes on from the next row.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

DP_WORKER = str(Path(__file__).resolve().parent / "dp_worker.py")
GROUPS = 4
TOPK = ["--codec", "topk", "--topk-density"]
NO_MOMENTUM = ["--outer-momentum", "0"]
NO_EF = ["--error-feedback", "off"]  # (on by default for int2 and topk)
EF = ["--error-feedback", "on"]
EAGER = ["--outer-delay", "1"]

# --full: at least 4000 inner steps, 4 groups, at equal tokens (name, groups, H, flags, fragments)
FULL_PLAN: List[tuple] = [  # (the rows nearest the goal first: a run cut short still answers it)
    ("data-parallel, 4 groups", GROUPS, None, [], 1),
    ("DiLoCo H=50, 4 groups", GROUPS, 50, [], 1),
    *((f"DiLoCo H={H} int2 +EF", GROUPS, H, ["--codec", "int2", *EF], 1) for H in (100, 50)),
    *((f"DiLoCo H={H} topk {d}% +EF", GROUPS, H, [*TOPK, str(d / 100), *EF], 1) for H in (100, 50) for d in (1, 3)),
    ("DiLoCo H=50 eager int2 +EF", GROUPS, 50, [*EAGER, "--codec", "int2", *EF], 1),
    ("DiLoCo H=50 eager", GROUPS, 50, EAGER, 1),
    ("DiLoCo H=50 int4", GROUPS, 50, ["--codec", "int4", *NO_EF], 1),
    ("DiLoCo H=50 int4 +EF", GROUPS, 50, ["--codec", "int4", *EF], 1),
]


PALETTE = ("orange", "green", "purple", "brown", "pink", "gray", "olive", "cyan", "red", "blue")


def curve_dp(records: List[Dict[str, Any]], tokens_per_step: int) -> List[tuple]:
    return [(r["step"] * tokens_per_step, r["eval_loss"]) for r in records if "eval_loss" in r]


def curve_diloco(records: List[Dict[str, Any]], tokens_per_outer: int) -> List[tuple]:
    return [
        (r["outer_step"] * tokens_per_outer, r["eval_loss"])
        for r in bl.committed(records)
        if r.get("eval_loss") is not None
    ]


def plot(curves: Dict[str, List[tuple]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=130)
    styles = {
        "single group (4x batch)": ("k", "--"),
        "data-parallel, 4 groups": ("tab:blue", "-"),
        "DiLoCo H=10, 4 groups": ("tab:orange", "-"),
        "DiLoCo H=50, 4 groups": ("tab:red", "-"),
        "Streaming P=4 tau=1 H=40": ("tab:green", "-"),
        "DiLoCo H=50 int8": ("tab:purple", ":"),
        "DiLoCo H=50 int4": ("tab:brown", ":"),
        "Streaming P=4 tau=1 H=40 int4": ("tab:olive", ":"),
        "DiLoCo H=100 int4": ("tab:gray", ":"),
    }
    # rows without a style of their own take colours no styled row of this plot has (matplotlib's cycle repeats them)
    taken = {styles[name][0] for name in curves if name in styles}
    spare = iter([c for c in (f"tab:{c}" for c in PALETTE) if c not in taken] * 2)
    for name, pts in curves.items():
        if not pts:
            continue
        color, ls = styles[name] if name in styles else (next(spare), "-")
        xs, ys = zip(*pts, strict=True)
        ax.plot(
            [x / 1e6 for x in xs],
            ys,
            ls,
            color=color,
            label=name,
            lw=1.8,
            marker="o" if len(pts) < 15 else None,
            ms=3.5,
        )
    ax.set_xlabel("training tokens, all groups (millions)")
    ax.set_ylabel("eval loss (held-out pydoc bytes)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    lo = min(y for pts in curves.values() for _, y in pts)
    ax.set_ylim(lo - 0.05, min(lo + 1.2, max(y for pts in curves.values() for _, y in pts) + 0.05))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_frontier(rows: List[list], dp_loss: float, path: Path) -> None:
    """Final eval loss against the bytes each group sent (log scale): the nearer the bottom left, the better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=130)
    placed: List[tuple] = []
    for name, loss, mb in rows:
        if loss is None or not mb:
            continue
        ax.scatter([mb], [loss], s=18, color="tab:blue" if "data-parallel" in name else "tab:red")
        # a label near one already placed (rows of about the same bytes and loss) goes one line lower
        near = sum(abs(math.log10(mb / m)) < 0.3 and abs(loss - lo) < 0.02 for lo, m in placed)
        placed.append((loss, mb))
        label = name.replace(", 4 groups", "")
        ax.annotate(label, (mb, loss), fontsize=6, xytext=(3, 2 - 7 * near), textcoords="offset points")
    ax.axhline(1.02 * dp_loss, color="k", ls=":", lw=1, label="data-parallel + 2%")
    ax.set_xscale("log")
    ax.set_xlabel("MB sent per group (log)")
    ax.set_ylabel("final eval loss")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the short version (default)")
    p.add_argument("--full", action="store_true", help="a longer run at the default sequence length")
    p.add_argument("--only", action="append", help="only the rows whose name contains this (repeatable)")
    p.add_argument("--name", help="the results' name (default quality, or quality-only with --only)")
    a = p.parse_args()
    started = time.time()
    cfg = (
        dict(model="tiny", seq_len=64, batch_size=8, steps=4000, H=[50], eval_batches=8)
        if a.full
        else dict(model="tiny", seq_len=64, batch_size=8, steps=400, H=[10, 50], eval_batches=8)
    )
    params = bl.model_params(cfg["model"], cfg["seq_len"])
    buffer_bytes = 4 * params
    ring = 2 * (GROUPS - 1) / GROUPS
    common = ["--model", cfg["model"], "--seq-len", str(cfg["seq_len"]), "--seed", "0"]
    eval_every = max(1, cfg["steps"] // 40)
    step_tokens = cfg["batch_size"] * cfg["seq_len"] * GROUPS
    print(
        f"benchmark 3: eval loss at equal tokens, model {cfg['model']} ({params / 1e6:.2f}M params), "
        f"{cfg['steps']} steps x {GROUPS} x {cfg['batch_size']} x {cfg['seq_len']} = "
        f"{cfg['steps'] * step_tokens / 1e6:.2f}M tokens"
    )

    # --full: rows finished by an earlier run of the same configuration are taken as they are
    done_file = bl.RESULTS / "quality-full-rows.json"
    done: Dict[str, Any] = {}
    if a.full and done_file.exists():
        saved = json.loads(done_file.read_text())
        done = saved["rows"] if saved.get("config") == cfg else {}
    work = Path(tempfile.mkdtemp(prefix="bench_quality-"))
    rows, curves, runs = [], {}, {}
    try:
        eval_args = [
            "--eval-every",
            str(eval_every),
            "--eval-batches",
            str(cfg["eval_batches"]),
            "--eval-batch-size",
            str(cfg["batch_size"]),
        ]
        plan: List[tuple] = [
            ("single group (4x batch)", 1, None, [], 1),
            ("data-parallel, 4 groups", GROUPS, None, [], 1),
            *((f"DiLoCo H={H}, 4 groups", GROUPS, H, [], 1) for H in cfg["H"]),
            # Streaming DiLoCo and the codecs (issue 10): bytes from the groups' own counts (sent_bytes)
            ("Streaming P=4 tau=1 H=40", GROUPS, 40, ["--fragments", "4", "--overlap-steps", "1"], 4),
            ("DiLoCo H=50 int8", GROUPS, 50, ["--codec", "int8"], 1),
            ("DiLoCo H=50 int4", GROUPS, 50, ["--codec", "int4"], 1),
            ("DiLoCo H=100 int4", GROUPS, 100, ["--codec", "int4"], 1),
            # error feedback, int2 and sparse syncs (issue 18)
            ("DiLoCo H=50 int4 +EF", GROUPS, 50, ["--codec", "int4", "--error-feedback", "on"], 1),
            ("DiLoCo H=50 int2", GROUPS, 50, ["--codec", "int2", *NO_EF], 1),
            ("DiLoCo H=50 int2 +EF", GROUPS, 50, ["--codec", "int2", "--error-feedback", "on"], 1),
            ("DiLoCo H=50 topk 2%", GROUPS, 50, [*TOPK, "0.02", *NO_EF], 1),
            ("DiLoCo H=50 topk 2% +EF", GROUPS, 50, [*TOPK, "0.02", "--error-feedback", "on"], 1),
            ("DiLoCo H=50 topk 1% +EF", GROUPS, 50, [*TOPK, "0.01", "--error-feedback", "on"], 1),
            # sparse syncs want many of them: at H=10, about int2's H=50 bytes
            ("DiLoCo H=10 topk 2%", GROUPS, 10, [*TOPK, "0.02", *NO_EF], 1),
            ("DiLoCo H=10 topk 2% +EF", GROUPS, 10, [*TOPK, "0.02", "--error-feedback", "on"], 1),
            ("DiLoCo H=10 topk 3% +EF", GROUPS, 10, [*TOPK, "0.03", "--error-feedback", "on"], 1),
            ("DiLoCo H=10 topk 1% +EF", GROUPS, 10, [*TOPK, "0.01", "--error-feedback", "on"], 1),
            (
                "DiLoCo H=10 topk 2% +EF, outer momentum 0",
                GROUPS,
                10,
                [*TOPK, "0.02", "--error-feedback", "on", *NO_MOMENTUM],
                1,
            ),
            # SparseLoCo's recipe: the residual stands in for the outer momentum
            (
                "DiLoCo H=50 topk 2% +EF, outer momentum 0",
                GROUPS,
                50,
                [*TOPK, "0.02", "--error-feedback", "on", *NO_MOMENTUM],
                1,
            ),
            # eager outer steps (--outer-delay 1): the sync overlaps the whole next window
            ("DiLoCo H=50 eager", GROUPS, 50, EAGER, 1),
            ("DiLoCo H=50 eager int2 +EF", GROUPS, 50, [*EAGER, "--codec", "int2", *EF], 1),
            ("DiLoCo H=10 eager", GROUPS, 10, EAGER, 1),
            ("DiLoCo H=10 eager int8", GROUPS, 10, [*EAGER, "--codec", "int8"], 1),
        ]
        if a.full:
            plan = FULL_PLAN
        if a.only:  # a subset (data-parallel always runs: every row is compared with it)
            plan = [row for row in plan if row[0].startswith("data-parallel") or any(o in row[0] for o in a.only)]
        for name, groups, H, extra, fragments in plan:
            t = time.time()
            if name in done:
                curve, sent = [tuple(c) for c in done[name]["curve"]], done[name]["bytes_sent_per_group"]
                curves[name], runs[name] = curve, done[name]
                rows.append([name, curve[-1][1] if curve else None, sent / 1e6])
                print(f"  {name:26s} eval loss {bl.fmt(rows[-1][1])}  (from {bl.rel(str(done_file))})")
                continue
            if H is None:
                batch = cfg["batch_size"] * GROUPS // groups
                run = bl.Run(
                    work / f"dp{groups}",
                    groups,
                    [*common, "--steps", str(cfg["steps"]), "--batch-size", str(batch), *eval_args],
                    script=DP_WORKER,
                ).wait(1800)
                records = run.metrics[0]
                curve = curve_dp(records, step_tokens)
                sent = 0 if groups == 1 else cfg["steps"] * ring * buffer_bytes
            else:
                # a folder per row: rows that share H must not resume from each other's checkpoints
                run = bl.Run(
                    work / "".join(c if c.isalnum() else "-" for c in name),
                    groups,
                    [
                        *common,
                        "--batch-size",
                        str(cfg["batch_size"]),
                        "--sync-every",
                        str(H),
                        "--outer-steps",
                        str(cfg["steps"] // H * fragments),
                        "--eval-batches",
                        str(cfg["eval_batches"]),
                        "--checkpoint-every",
                        "1000000",
                        "--min-replicas",
                        str(groups),
                        *extra,
                    ],
                ).wait(1800)
                records = run.metrics[0]
                curve = curve_diloco(records, H // fragments * step_tokens)
                # what group 0 says it sent (the codec's count; a ring all-reduce's for fp32)
                sent = sum(r.get("sent_bytes", 0) for r in bl.committed(records))
                # a dropped round (a group that timed out on a loaded machine) changes the result: say so
                planned, made = cfg["steps"] // H * fragments, len(bl.committed(records))
                if made < planned:
                    print(f"  {name}: only {made} of {planned} outer steps committed (rounds were dropped)")
            curves[name] = curve
            runs[name] = {"wall_s": round(time.time() - t, 1), "curve": curve, "bytes_sent_per_group": sent}
            if H is not None:
                runs[name]["committed_outer_steps"] = made
            if a.full:
                bl.RESULTS.mkdir(parents=True, exist_ok=True)
                done[name] = runs[name]
                done_file.write_text(json.dumps({"config": cfg, "rows": done}, indent=1) + "\n")
            final = curve[-1][1] if curve else None
            rows.append([name, final, sent / 1e6])
            print(
                f"  {name:26s} eval loss {bl.fmt(final)}  sent/group {sent / 1e6:9.1f} MB  "
                f"(wall {time.time() - t:.0f}s)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    dp_row = next(r for r in rows if r[0].startswith("data-parallel"))
    dp_loss, dp_bytes = dp_row[1], dp_row[2]
    table_rows = [
        [name, loss, bl.ratio(loss, dp_loss) and 100 * (loss / dp_loss - 1), mb, bl.ratio(dp_bytes, mb) if mb else None]
        for name, loss, mb in rows
    ]
    print(
        bl.table(
            ["method", "final eval loss", "vs DP %", "MB sent per group", "DP bytes / bytes"], table_rows, digits=3
        )
    )
    # a subset does not replace the whole table
    result_name = a.name or ("quality-only" if a.only else "quality")  # (write_result adds -full)
    suffix = result_name.removeprefix("quality") + ("-full" if a.full else "")
    png = bl.RESULTS / f"loss_vs_tokens{suffix}.png"
    bl.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(
        curves,
        f"GPT {cfg['model']} ({params / 1e6:.2f}M params) on pydoc, seq {cfg['seq_len']}, "
        f"{GROUPS} groups x batch {cfg['batch_size']}",
        png,
    )
    print(f"wrote {bl.rel(str(png))}")
    frontier = bl.RESULTS / f"loss_vs_bytes{suffix}.png"
    plot_frontier(rows, dp_loss, frontier)
    print(f"wrote {bl.rel(str(frontier))}")
    goals = {}
    for name, loss, mb in (r for r in rows if "DiLoCo" in r[0] or "Streaming" in r[0]):
        goals[f"{name}: within 2% of DP eval loss"] = (
            loss is not None and dp_loss is not None and loss <= 1.02 * dp_loss
        )
        wanted = 1000 if "int2" in name or "topk" in name else 400 if "int4" in name else 50
        goals[f"{name}: >= {wanted}x fewer bytes than DP"] = bool(mb) and dp_bytes / mb >= wanted
    bl.write_result(
        result_name,
        {
            "config": {
                **cfg,
                "params": params,
                "groups": GROUPS,
                "eval_every_dp": eval_every,
                "bytes_model": "data-parallel: ring all-reduce, 2(n-1)/n x 4 bytes x params per step; DiLoCo: the "
                "sum of group 0's sent_bytes (its codec's count: 2(n-1)/n x encoded payload per sync)",
            },
            "results": [
                {
                    "method": r[0],
                    "final_eval_loss": r[1],
                    "vs_dp_pct": r[2],
                    "mb_sent_per_group": r[3],
                    "dp_bytes_over_bytes": r[4],
                }
                for r in table_rows
            ],
            "runs": runs,
            "goals": goals,
            "png": bl.rel(str(png)),
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
