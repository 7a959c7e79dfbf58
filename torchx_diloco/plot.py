"""``python -m torchx_diloco.plot RUN_DIR [--out PNG]``: one picture of a run, drawn from its metrics.

RUN_DIR is the run's ``--checkpoint-dir`` (any fsspec URL): the groups write ``metrics/replica_group_<g>.jsonl``
there (torchx_diloco/metrics.py). The PNG has four panels: training and eval loss of each group against the
tokens it trained on, the seconds each sync took, how many groups took part in each outer step, and tokens/s.

Needs matplotlib (extra: plot). Imports no torch.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

import fsspec

from torchx_diloco.errors import UserError

PROG = "python -m torchx_diloco.plot"
EXTRA = "pip install 'torchx-diloco[plot]'"


def read_run(run_dir: str) -> Dict[int, List[Dict[str, Any]]]:
    """group -> its metrics records, in file order (a line cut short by a kill is skipped)."""
    base = run_dir.rstrip("/")
    try:
        fs, path = fsspec.core.url_to_fs(f"{base}/metrics")
        found = sorted(fs.glob(f"{path}/replica_group_*.jsonl"))
    except (ImportError, ValueError, OSError) as e:
        raise UserError(f"cannot read {base!r} ({e}): pass the run's --checkpoint-dir") from None
    runs: Dict[int, List[Dict[str, Any]]] = {}
    for file in found:
        match = re.search(r"replica_group_(\d+)\.jsonl$", file)
        if match is None:
            continue
        records = []
        for line in fs.cat_file(file).decode(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        if records:
            runs[int(match.group(1))] = records
    if not runs:
        raise UserError(
            f"no metrics under {base}/metrics (replica_group_*.jsonl): pass the run's --checkpoint-dir, "
            "after at least one outer step"
        )
    return runs


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError(f"plotting needs matplotlib: {EXTRA}") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_run(runs: Dict[int, List[Dict[str, Any]]], title: str = "") -> bytes:
    """The PNG (bytes) of ``runs`` (:func:`read_run`)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    loss_ax, sync_ax, part_ax, speed_ax = axes.flat
    for group, records in sorted(runs.items()):
        done = [r for r in records if r.get("committed")]
        dropped = [r for r in records if not r.get("committed") and "outer_step" in r]
        # tokens: written since the --grad-accum change; older runs are plotted against inner steps
        x_key = "tokens" if all("tokens" in r for r in done) else "inner_steps"
        color = f"C{group % 10}"
        loss_ax.plot([r[x_key] for r in done], [r["loss"] for r in done], color=color, label=f"group {group} train")
        evals = [r for r in done if r.get("eval_loss") is not None]
        if evals:
            loss_ax.plot(
                [r[x_key] for r in evals],
                [r["eval_loss"] for r in evals],
                color=color,
                linestyle="--",
                label=f"group {group} eval",
            )
        loss_ax.set_xlabel("tokens trained on (per group)" if x_key == "tokens" else "inner steps")
        steps = [r["outer_step"] for r in done]
        sync_ax.plot(steps, [r.get("sync_s", 0.0) for r in done], marker="o", color=color, label=f"group {group}")
        if dropped:
            sync_ax.scatter(
                [r["outer_step"] for r in dropped],
                [r.get("sync_s", 0.0) for r in dropped],
                marker="x",
                color=color,
                label=f"group {group} dropped round",
            )
        part_ax.step(steps, [r.get("participants", 0) for r in done], where="mid", color=color, label=f"group {group}")
        speeds = [r.get("tokens_per_s", 0.0) for r in done]
        speed_ax.plot(steps, speeds, marker=".", color=color, label=f"group {group}")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("training (solid) and eval (dashed) loss")
    sync_ax.set(xlabel="outer step", ylabel="seconds", title="sync time")
    part_ax.set(xlabel="outer step", ylabel="groups", title="participants per outer step")
    part_ax.set_ylim(0, max(r.get("participants", 0) for rs in runs.values() for r in rs) + 0.5)
    for ax in (sync_ax, part_ax, speed_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
    part_ax.yaxis.get_major_locator().set_params(integer=True)
    speed_ax.set(xlabel="outer step", ylabel="tokens/s", title="throughput per group")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="One picture of a run, drawn from its metrics.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's --checkpoint-dir (any fsspec URL)")
    parser.add_argument("--out", help="where to write the PNG (any fsspec URL; default: RUN_DIR/metrics/run.png)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _pyplot()  # before reading anything: a missing extra is the first thing to say
        runs = read_run(args.run_dir)
        out = args.out or f"{args.run_dir.rstrip('/')}/metrics/run.png"
        png = plot_run(runs, title=args.run_dir)
        try:
            with fsspec.open(out, "wb") as f:
                f.write(png)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot write {out!r} ({e}): pass a writable --out") from None
    except UserError as e:
        print(f"torchx_diloco.plot: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    print(f"wrote {out} ({len(runs)} group{'s' if len(runs) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
