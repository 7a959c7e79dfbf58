"""Render benchmarks/results/*.json as the markdown tables of the README's benchmark section (to stdout)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402


def load(name: str):
    path = bl.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def vs_torchft(d) -> str:
    c = d["config"]
    rows = [
        [
            "seconds per outer round (median)",
            d["median_round_s"]["torchx_diloco"],
            d["median_round_s"]["torchft"],
            d["round_ratio"],
        ],
        [
            "seconds per sync (median)",
            d["median_sync_s"]["torchx_diloco"],
            d["median_sync_s"]["torchft"],
            d["sync_ratio"],
        ],
    ]
    return (
        f"GPT `{c['model']}` ({c['params'] / 1e6:.1f}M parameters), 2 groups, H={c['H']}, {c['outer_steps']} outer "
        f"steps, batch {c['batch_size']} x {c['seq_len']}, {c['reps']} runs per side, interleaved "
        f"({d['date'][:10]}):\n\n"
        + bl.table(["", "torchx_diloco", "torchft.local_sgd.DiLoCo", "ours / torchft"], rows)
        + "\n\nLargest difference between the two runs' final global weights (from the checkpoints): "
        + ", ".join(f"{x:.1e}" for x in d["max_abs_weight_diff"])
        + "."
        + _vs_torchft_streaming(d.get("streaming"))
    )


def _vs_torchft_streaming(s) -> str:
    """The Streaming DiLoCo comparison (results from before it existed have none)."""
    if not s:
        return ""
    med_r, med_s = s["median_round_s"], s["median_sync_s"]
    rows = [
        ["seconds per fragment round (median)", med_r["torchx_diloco"], med_r["torchft"], s["round_ratio"]],
        [
            "seconds stalled per sync (median)",
            med_s["torchx_diloco"],
            med_s["torchft"],
            bl.ratio(med_s["torchx_diloco"], med_s["torchft"]),
        ],
    ]
    return (
        f"\n\nStreaming DiLoCo (`{' '.join(s['flags'])}`, fp32), same runs otherwise:\n\n"
        + bl.table(["", "torchx_diloco", "torchft.local_sgd.DiLoCo", "ours / torchft"], rows)
        + "\n\nLargest difference between the final global weights: "
        + ", ".join(f"{x:.1e}" for x in s["max_abs_weight_diff"])
        + "."
    )


def link(d) -> str:
    if "skipped" in d:
        return f"Skipped: {d['skipped']}"
    c = d["config"]
    rows = [
        [
            r["link"] if r["link"] != "none" else "unshaped",
            r["method"],
            round(r["tokens_per_s"]),
            f"{100 * r['utilisation']:.0f}%",
            f"{1e3 * _wait(r, c):.1f}",
            f"{r['bytes_per_inner_step'] / 1e3:.0f}" if r["bytes_per_inner_step"] else "-",
            f"{r['expected_bytes_per_inner_step'] / 1e3:.1f}",
            f"{r['bytes_per_inner_step'] / r['expected_bytes_per_inner_step']:.3f}"
            if r["bytes_per_inner_step"]
            else "-",
        ]
        for r in d["results"]
    ]
    return (
        f"GPT `{c['model']}` ({c['params'] / 1e6:.2f}M parameters, {c['model_bytes'] / 1e6:.1f} MB), 2 groups, "
        f"{c['steps']} inner steps of batch {c['batch_size']} x {c['seq_len']} each ({d['date'][:10]}):\n\n"
        + bl.table(
            [
                "link",
                "method",
                "tokens/s per group",
                "compute utilisation",
                "ms waiting per inner step",
                "kB sent per inner step",
                "expected kB (payload + scales) / H",
                "measured / expected",
            ],
            rows,
        )
    )


def _wait(r, c) -> float:
    """Seconds per inner step spent on the network (older results lack the field: derive it)."""
    if "wait_s_per_inner_step" in r:
        return r["wait_s_per_inner_step"]
    return (1 - r["utilisation"]) * c["batch_size"] * c["seq_len"] / r["tokens_per_s"]


def quality(d) -> str:
    c = d["config"]
    rows = [
        [
            r["method"],
            r["final_eval_loss"],
            f"{r['vs_dp_pct']:+.1f}%" if r["vs_dp_pct"] is not None else "-",
            f"{r['mb_sent_per_group']:.0f}",
            f"{r['dp_bytes_over_bytes']:.0f}x" if r["dp_bytes_over_bytes"] else "-",
        ]
        for r in d["results"]
    ]
    tokens = c["steps"] * c["groups"] * c["batch_size"] * c["seq_len"]
    return (
        f"GPT `{c['model']}` ({c['params'] / 1e6:.2f}M parameters), {tokens / 1e6:.2f}M tokens for every method "
        f"({c['steps']} steps x {c['groups']} groups x batch {c['batch_size']} x {c['seq_len']}; the single "
        f"group takes a 4x batch), eval on {c['eval_batches'] * c['batch_size']} held-out windows "
        f"({d['date'][:10]}):\n\n"
        + bl.table(["method", "final eval loss", "vs data-parallel", "MB sent per group", "fewer bytes than DP"], rows)
    )


def _throughput_rows(t) -> list:
    if "rows" not in t:  # results from before the sharded and S3 rows
        return [["`CheckpointStore.write_part` vs raw `fs.pipe_file`", f"{t['ratio_pct']:.0f}%", "-", ">= 80%"]]
    return [
        [
            f"checkpoint write vs raw `fs.pipe_file` of the same bytes ({name})",
            f"{r['ratio_pct']:.0f}%",
            f"{r['ours_mb_s']:.0f} vs {r['raw_mb_s']:.0f} MB/s ({r['bytes'] / 1e6:.0f} MB)",
            ">= 80%",
        ]
        for name, r in t["rows"].items()
    ]


def durability(d) -> str:
    s, t = d["slowdown"], d["throughput"]
    rows = [
        [
            "inner loop while a checkpoint is being written vs not",
            f"{s['slowdown_pct']:.1f}% slower",
            f"median over {len(s['paired_ratios'])} rounds, each against its two neighbours; median tokens/s "
            f"{s['median_on']:.0f} vs {s['median_off']:.0f}",
            "<= 5%",
        ],
    ]
    rows += _throughput_rows(t)
    for m in d["memory"]["models"]:
        rows.append(
            [
                f"host memory DiLoCo adds (`{m['preset']}`, {m['param_bytes'] / 1e6:.0f} MB of parameters{_pt(m)})",
                f"{m['diloco_over_params']:.2f}x parameters",
                f"a sync adds {m['peak_over_params']:.2f}x more while it runs",
                "~2x",
            ]
        )
    for how, r in d["recovery"].items():
        rows.append(
            [
                f"SIGKILL a group, restart it: to its first committed outer step ({how})",
                f"{r['median_s']:.1f} s",
                f"median of {len(r['samples'])}; the survivor paused {r['survivor_pause_median_s']:.1f} s",
                "-",
            ]
        )
    c = d["config"]
    return f"GPT `{c['model']}`, H={c['H']} for the slowdown ({d['date'][:10]}):\n\n" + bl.table(
        ["cost", "measured", "detail", "goal"], rows
    )


def _pt(m) -> str:
    return f", P={m['fragments']} tau={m.get('overlap_steps', 0)}" if "fragments" in m else ""


def memory(d) -> str:
    """``bench_durability.py --memory-only``: host memory with fragments and overlap."""
    rows = [
        [
            f"`{m['preset']}`",
            m["fragments"],
            m.get("overlap_steps", 0),
            f"{m['diloco_over_params']:.2f}x",
            f"{m['tensors_held_over_params']:.2f}x",
            f"{m['peak_over_params']:.2f}x",
            f"{m['peak_during_sync_bytes'] / 1e6:.0f}",
        ]
        for m in d["models"]
    ]
    heads = ["model", "P", "tau", "DiLoCo adds", "tensors held", "a sync adds (peak)", "sync peak MB"]
    return f"Host memory, in parameters' bytes ({d['date'][:10]}):\n\n" + bl.table(heads, rows)


def groups(d) -> str:
    """``bench_groups.py``: 2 groups of 1 or 2 ranks, bytes across groups per sync and memory per rank."""
    if "skipped" in d:
        return f"Skipped: {d['skipped']}"
    c = d["config"]
    base = d["results"][0]
    rows = [
        [
            r["layout"],
            f"{r['bytes_per_sync'] / 1e6:.2f}",
            f"{r['over_model_bytes']:.3f}",
            f"{r['sent_bytes_rank0'] / c['model_bytes']:.2f}",
            f"{r['state_bytes_max'] / 1e6:.0f}",
            f"{r['peak_rss_bytes_max'] / 1e6:.0f}",
            f"{r['peak_rss_bytes_max'] / base['peak_rss_bytes_max']:.2f}",
            f"{r['rss_to_last_commit_max'] / 1e6:.0f}" if r.get("rss_to_last_commit_max") else "-",
        ]
        for r in d["results"]
    ]
    heads = [
        "layout (2 groups)",
        "MB sent per group per sync",
        "/ model bytes",
        "rank 0 sends / model",
        "state MB per rank",
        "peak RSS MB per rank (max of the ranks)",
        "RSS vs 1 rank",
        "RSS MB to the last commit (sampled)",
    ]
    return (
        f"GPT `{c['model']}` {c['model_args']} ({c['params'] / 1e6:.1f}M parameters, {c['model_bytes'] / 1e6:.1f} MB), "
        f"H={c['H']}, {c['outer_steps']} outer steps, batch {c['batch_size']} x {c['seq_len']} per rank "
        f"({d['date'][:10]}):\n\n" + bl.table(heads, rows)
    )


def main() -> int:
    sections = (
        ("vs_torchft", vs_torchft),
        ("link", link),
        ("quality", quality),
        ("durability", durability),
        ("memory", memory),
        ("groups", groups),
    )
    for name, fn in sections:
        d = load(name)
        print(f"### {name}\n")
        print(fn(d) if d else "(no results yet)")
        if d:
            print(
                f"\n`{d['command']}` on {d['machine']['cpu_count']} x {d['machine']['cpu']}, "
                f"torch {d['machine']['torch']}, torchft {d['machine']['torchft']}.\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
