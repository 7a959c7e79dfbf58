"""``python -m torchx_diloco.plot RUN_DIR [--out PNG]``: one picture of a run, drawn from its metrics.

RUN_DIR is the run's ``--checkpoint-dir`` (any fsspec URL): the groups write ``metrics/replica_group_<g>.jsonl``
there (torchx_diloco/metrics.py). The PNG has four panels: training and eval loss of each group against the
tokens it trained on, the seconds each sync took, how many groups took part in each outer step, and tokens/s;
and, where the records hold them, the bytes each sync sent (``sent_bytes``: what DiLoCo saves) and the learning
rates (``inner_lr``, the AdamW rate at the step, and ``outer_lr``). Older metrics without them get the four.

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


BYTES_TITLE = "bytes sent per sync (the group's rank 0)"
LR_TITLE = "learning rates"


def _has(runs: Dict[int, List[Dict[str, Any]]], *keys: str) -> bool:
    """Whether any committed record of the run holds one of ``keys`` (metrics of older versions hold none)."""
    return any(r.get("committed") and k in r for rs in runs.values() for r in rs for k in keys)


def _by_outer_step(ax: Any, records: List[Dict[str, Any]], key: str, **style: Any) -> None:
    """``key`` of the records that hold it, against their outer step."""
    having = [r for r in records if key in r]
    ax.plot([r["outer_step"] for r in having], [r[key] for r in having], **style)


def figure(runs: Dict[int, List[Dict[str, Any]]], title: str = "") -> Any:
    """The matplotlib Figure of ``runs`` (:func:`read_run`): four panels, plus bytes sent and learning rates where
    the records hold them."""
    plt = _pyplot()
    extra = [name for name, keys in (("bytes", ("sent_bytes",)), ("lr", ("inner_lr", "outer_lr"))) if _has(runs, *keys)]
    rows = 2 + (len(extra) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows), constrained_layout=True, squeeze=False)
    flat = list(axes.flat)
    loss_ax, sync_ax, part_ax, speed_ax = flat[:4]
    panels = dict(zip(extra, flat[4:], strict=False))
    for unused in flat[4 + len(extra) :]:
        fig.delaxes(unused)
    outer_lr_ax = panels["lr"].twinx() if "lr" in panels else None
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
        if "bytes" in panels:
            _by_outer_step(panels["bytes"], done, "sent_bytes", marker="o", color=color, label=f"group {group}")
        if outer_lr_ax is not None:
            _by_outer_step(panels["lr"], done, "inner_lr", marker=".", color=color, label=f"group {group} inner")
            _by_outer_step(outer_lr_ax, done, "outer_lr", linestyle="--", color=color, label=f"group {group} outer")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("training (solid) and eval (dashed) loss")
    sync_ax.set(xlabel="outer step", ylabel="seconds", title="sync time")
    part_ax.set(xlabel="outer step", ylabel="groups", title="participants per outer step")
    part_ax.set_ylim(0, max(r.get("participants", 0) for rs in runs.values() for r in rs) + 0.5)
    speed_ax.set(xlabel="outer step", ylabel="tokens/s", title="throughput per group")
    if "bytes" in panels:
        panels["bytes"].set(
            xlabel="outer step (with --fragments: one fragment's sync)", ylabel="bytes", title=BYTES_TITLE
        )
        panels["bytes"].set_ylim(bottom=0)
    if outer_lr_ax is not None:
        panels["lr"].set(xlabel="outer step", ylabel="inner lr (AdamW, solid)", title=LR_TITLE)
        outer_lr_ax.set_ylabel("outer lr (SGD Nesterov, dashed)")
        panels["lr"].set_ylim(bottom=0)
        outer_lr_ax.set_ylim(bottom=0)
        outer_lr_ax.legend(fontsize="small", loc="lower right")
    for ax in (sync_ax, part_ax, speed_ax, *panels.values()):
        ax.xaxis.get_major_locator().set_params(integer=True)
    part_ax.yaxis.get_major_locator().set_params(integer=True)
    for ax in (loss_ax, sync_ax, part_ax, speed_ax, *panels.values()):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def plot_run(runs: Dict[int, List[Dict[str, Any]]], title: str = "") -> bytes:
    """The PNG (bytes) of ``runs`` (:func:`read_run`)."""
    fig = figure(runs, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="One picture of a run, drawn from its metrics.", allow_abbrev=False
    )
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
