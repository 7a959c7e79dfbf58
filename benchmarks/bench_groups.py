"""Benchmark 7: replica groups of several ranks: the bytes that cross groups per sync, and each rank's memory.

Two replica groups, each (its torchrun agent and every rank) in its own network namespace joined to a hub
namespace (the lighthouse) by a veth (:mod:`torchx_diloco._fleet.netlab`, unshaped): a group's intra-group traffic
(DDP's all-reduces, FSDP's all-gathers and reduce-scatters, DiLoCo's all-gather of the summed slices) stays on its own
loopback, and the veth's ``tx_bytes`` counts only what leaves the group. Three layouts, the same model and H:
2 groups x 1 rank (the baseline), 2 x 2 ranks ``--parallel ddp`` (rank r sends slice r of the pseudo-gradient)
and 2 x 2 ranks ``--parallel fsdp`` (each rank syncs its own shards). Reports, per group and sync, the bytes sent
over the veth, raw and less the background (heartbeats, measured over the compute stretches between syncs), as a
ratio to the model's fp32 bytes (goal: about 1x whatever the ranks); and per rank, its peak RSS (VmHWM, sampled
from /proc) and the bytes of training state it holds (parameters, global weights' backup, outer momentum, AdamW
moments: the trainer's ``state_bytes``, from its local tensors). Needs root (``ip netns``).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402
from torchx_diloco._fleet import netlab  # noqa: E402
from torchx_diloco._fleet.netlab import HUB_ADDR  # noqa: E402
from torchx_diloco._fleet.testing import Group, Proc, metrics_url  # noqa: E402

SETTLE_S = 0.2  # > the tx sampling period (0.05 s)
QUIET_MARGIN_S = 0.5  # a compute stretch ends this long before the sync's step began (quorum, lighthouse check)
# not bench_link's prefix: building a lab removes stale namespaces of its prefix, and the two may run side by side
PREFIX = "dlgroups-"
LAYOUTS = [("1 rank", 1, "ddp"), ("2 ranks ddp", 2, "ddp"), ("2 ranks fsdp", 2, "fsdp")]
STATE_LINE = re.compile(r"group (\d+) rank (\d+) holds training state of (\{.*?\}) bytes")


def vm_kib(pid: int, field: str) -> Optional[int]:
    """``field`` (VmHWM, VmRSS) of /proc/<pid>/status in KiB, None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakSampler(threading.Thread):
    """Polls every rank of every group until stopped: its VmHWM (the kernel's own peak of the RSS, whole life),
    and its VmRSS with the time, to tell the training's peak from the final checkpoint's."""

    def __init__(self, groups: List[Group], period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.groups, self.period = groups, period
        self.peak_kib: Dict[Tuple[int, int], int] = {}
        self.rss: List[Tuple[float, Tuple[int, int], int]] = []  # (unix time, (group, rank), VmRSS KiB)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for g in self.groups:
                for rank, pid in enumerate(g.workers()):
                    key = (g.group, rank)
                    hwm, rss = vm_kib(pid, "VmHWM"), vm_kib(pid, "VmRSS")
                    if hwm is not None:
                        self.peak_kib[key] = max(hwm, self.peak_kib.get(key, 0))
                    if rss is not None:
                        self.rss.append((time.time(), key, rss))
            self.stop.wait(self.period)

    def rss_peak_before(self, key: Tuple[int, int], t: float) -> Optional[int]:
        """The largest VmRSS sampled for ``key`` before ``t``, in bytes (a short spike between samples is missed)."""
        seen = [kib for when, k, kib in self.rss if k == key and when <= t]
        return 1024 * max(seen) if seen else None


def quiet_rates(samples: List[Tuple[float, int]], records: List[Dict[str, Any]]) -> List[float]:
    """Bytes/s the group sent in each stretch where it only computed (heartbeats to the lighthouse): from just
    after one commit to a margin before the next sync's step began (rank 0's clock of it)."""
    rates = []
    for prev, cur in zip(records, records[1:], strict=False):
        t0, t1 = prev["time"] + SETTLE_S, cur["time"] - cur["sync_s"] - QUIET_MARGIN_S
        b = netlab.bytes_between(samples, t0, t1) if t1 - t0 >= 0.5 else None
        if b is not None:
            rates.append(b / (t1 - t0))
    return rates


def group_bytes(samples: List[Tuple[float, int]], records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Bytes per sync over the rounds after the first (whose sync follows the initial agreement and heal)."""
    done = bl.committed(records)
    window = done[1:]
    t0, t1 = done[0]["time"] + SETTLE_S, window[-1]["time"] + SETTLE_S
    raw = netlab.bytes_between(samples, t0, t1)
    # the median stretch: heartbeats are steady, and a stretch that caught the edge of a sync must not count
    stretches = quiet_rates(samples, done)
    rate = bl.median(stretches)
    per_sync = raw / len(window) if raw is not None else None
    background = rate * (t1 - t0) / len(window) if rate is not None else None
    return {
        "syncs_measured": len(window),
        "bytes_per_sync_raw": per_sync,
        "background_bytes_per_s": rate,
        "quiet_stretch_bytes_per_s": stretches,
        "background_bytes_per_sync": background,
        "bytes_per_sync": per_sync - background if per_sync is not None and background is not None else per_sync,
        "sent_bytes_rank0": window[-1].get("sent_bytes"),  # the trainer's own count, rank 0's share
        "sync_s_median": bl.median(r["sync_s"] for r in window),
    }


def run_layout(lab: netlab.Lab, work: Path, nproc: int, parallel: str, args: List[str]) -> Dict[str, Any]:
    work.mkdir(parents=True)
    lighthouse, url = bl.start_lighthouse(work, 2, netns=lab.hub, host=HUB_ADDR)
    samplers = [Proc(lab.sampler_argv(g), work / f"tx{g}.log") for g in range(2)]
    ckpt = work / "ckpt"
    full = [*args, "--parallel", parallel, "--checkpoint-dir", str(ckpt)]
    started = time.time()
    groups = [lab.group(g, 2, url, full, work, nproc=nproc, max_restarts=0) for g in range(2)]
    peaks = PeakSampler(groups)
    peaks.start()
    try:
        for member in groups:
            rc = member.wait(600)
            if rc != 0:
                raise RuntimeError(f"group {member.group} exited {rc}:\n{member.output()[-3000:]}")
    finally:
        peaks.stop.set()
        peaks.join()
        for p in [*groups, *samplers, lighthouse]:
            p.kill()
    wall = time.time() - started
    records = [bl.read_metrics(metrics_url(ckpt, g)) for g in range(2)]
    per_group = [group_bytes(netlab.read_samples(work / f"tx{g}.log"), records[g]) for g in range(2)]
    held: Dict[Tuple[int, int], Dict[str, int]] = {}
    for member in groups:
        for m in STATE_LINE.finditer(member.output()):
            held[(int(m.group(1)), int(m.group(2)))] = ast.literal_eval(m.group(3))
    ranks = []
    for g in range(2):
        for r in range(nproc):
            state = held.get((g, r))
            ranks.append(
                {
                    "group": g,
                    "rank": r,
                    "peak_rss_bytes": 1024 * peaks.peak_kib[(g, r)] if (g, r) in peaks.peak_kib else None,
                    # up to the last commit: training and syncs, without the final checkpoint's write
                    "rss_peak_to_last_commit_bytes": peaks.rss_peak_before(
                        (g, r), bl.committed(records[g])[-1]["time"]
                    ),
                    "state": state,
                    "state_bytes": sum(state.values()) if state else None,
                }
            )
    return {"wall_s": wall, "per_group": per_group, "ranks": ranks, "tokens_per_s": records[0][-1]["tokens_per_s"]}


def mean(xs: List[Any]) -> Optional[float]:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the short version (default): 5 syncs measured per layout")
    p.add_argument("--full", action="store_true", help="15 syncs measured per layout")
    p.add_argument("--keep", metavar="DIR", help="keep the runs' logs and tx samples in DIR (default: removed)")
    a = p.parse_args()
    started, load_before = time.time(), os.getloadavg()
    why = netlab.available()
    if why:
        print(f"benchmark 7 skipped: {why}")
        bl.write_result("groups", {"skipped": why}, started)
        return 0
    cfg: Dict[str, Any] = dict(
        model="small",
        model_args='{"n_layer": 8, "n_embd": 512, "n_head": 8}',
        seq_len=64,
        batch_size=2,
        H=2,
        outer_steps=16 if a.full else 6,
    )
    from torchx_diloco.modeling import build_model

    params = sum(p.numel() for p in build_model(cfg["model"], cfg["model_args"], cfg["seq_len"]).parameters())
    model_bytes = 4 * params
    args = [
        *("--model", cfg["model"], "--model-args", cfg["model_args"]),
        *("--seq-len", str(cfg["seq_len"]), "--batch-size", str(cfg["batch_size"])),
        *("--sync-every", str(cfg["H"]), "--outer-steps", str(cfg["outer_steps"]), "--min-replicas", "2"),
        *("--eval-batches", "0", "--checkpoint-every", "1000000", "--device", "cpu"),
    ]
    print(
        f"benchmark 7: 2 groups of 1 or 2 ranks, each in its own network namespace; GPT {cfg['model']} "
        f"{cfg['model_args']} ({params / 1e6:.1f}M params, {model_bytes / 1e6:.1f} MB fp32), H={cfg['H']}, "
        f"{cfg['outer_steps']} outer steps",
        flush=True,
    )
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_groups-"))
    results = []
    try:
        with netlab.Lab(2, prefix=PREFIX) as lab:
            for name, nproc, parallel in LAYOUTS:
                tag = name.replace(" ", "-")
                r = run_layout(lab, work / tag, nproc, parallel, args)
                sent = mean([g["bytes_per_sync"] for g in r["per_group"]])
                row = {"layout": name, "ranks_per_group": nproc, "parallel": parallel, **r}
                row["bytes_per_sync"] = sent
                row["bytes_per_sync_raw"] = mean([g["bytes_per_sync_raw"] for g in r["per_group"]])
                row["over_model_bytes"] = sent / model_bytes if sent else None
                row["peak_rss_bytes_max"] = max((x["peak_rss_bytes"] or 0) for x in r["ranks"]) or None
                row["state_bytes_max"] = max((x["state_bytes"] or 0) for x in r["ranks"]) or None
                row["rss_to_last_commit_max"] = (
                    max((x["rss_peak_to_last_commit_bytes"] or 0) for x in r["ranks"]) or None
                )
                row["sent_bytes_rank0"] = r["per_group"][0]["sent_bytes_rank0"]
                results.append(row)
                print(
                    f"  {name:13s} {bl.fmt(sent)} B/sync per group ({bl.fmt(row['over_model_bytes'])}x model), "
                    f"peak RSS per rank {', '.join(bl.fmt((x['peak_rss_bytes'] or 0) / 1e6, 0) for x in r['ranks'])}"
                    f" MB, state {bl.fmt((row['state_bytes_max'] or 0) / 1e6, 0)} MB (wall {r['wall_s']:.0f}s)",
                    flush=True,
                )
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    base = results[0]
    rows = [
        [
            r["layout"],
            (r["bytes_per_sync_raw"] or 0) / 1e6,
            (r["bytes_per_sync"] or 0) / 1e6,
            r["over_model_bytes"],
            bl.ratio(r["sent_bytes_rank0"], model_bytes),
            (r["state_bytes_max"] or 0) / 1e6,
            bl.ratio(r["state_bytes_max"], base["state_bytes_max"]),
            (r["peak_rss_bytes_max"] or 0) / 1e6,
            bl.ratio(r["peak_rss_bytes_max"], base["peak_rss_bytes_max"]),
            ((r["peak_rss_bytes_max"] or 0) - (r["state_bytes_max"] or 0)) / 1e6,
            (r["rss_to_last_commit_max"] or 0) / 1e6,
        ]
        for r in results
    ]
    print(
        bl.table(
            [
                "layout (2 groups)",
                "MB sent per group per sync (raw)",
                "less heartbeats",
                "/ model fp32 bytes",
                "rank 0's own count / model",
                "state MB per rank",
                "vs 1 rank",
                "peak RSS MB per rank (max)",
                "vs 1 rank",
                "peak RSS - state MB",
                "RSS to the last commit MB (sampled)",
            ],
            rows,
            digits=3,
        )
    )
    goals = {
        f"{r['layout']}: about 1x model bytes per group per sync ({r['over_model_bytes']:.3f})": abs(
            (r["over_model_bytes"] or 0) - 1
        )
        <= 0.05
        for r in results
    }
    fsdp = next(r for r in results if r["parallel"] == "fsdp")
    ddp = next(r for r in results if r["parallel"] == "ddp" and r["ranks_per_group"] == 2)
    goals["fsdp holds about half of ddp's state per rank"] = (
        abs((bl.ratio(fsdp["state_bytes_max"], ddp["state_bytes_max"]) or 0) - 0.5) <= 0.05
    )
    for k, v in goals.items():
        print(f"  {'ok  ' if v else 'MISS'} {k}")
    bl.write_result(
        "groups",
        {
            "config": {**cfg, "params": params, "model_bytes": model_bytes, "groups": 2, "link": "veth, unshaped"},
            "loadavg_before": load_before,  # the machine's own "loadavg_at_start" is read as the JSON is written
            "loadavg_at_end": os.getloadavg(),
            "results": results,
            "goals": goals,
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
