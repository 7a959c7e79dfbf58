"""Benchmark 4: what durability and recovery cost.

1. Inner-loop slowdown while checkpoints are written: one group with ``--checkpoint-every 2``; the median
   tokens/s of the rounds that overlap a checkpoint write against the rounds that don't, which alternate
   round by round in the same run (goal: <= 5% slower).
2. Checkpoint write throughput: ``CheckpointStore.write_part`` (serialise, checksum, write, manifest) against
   a raw ``fs.pipe_file`` of the same bytes to the same folder, interleaved, in-process (goal: >= 80%).
3. Host memory DiLoCo adds over the model (goal ~2x the parameters: the global weights and the outer
   momentum): RSS of a fresh process before and after building ``torchx_diloco.DiLoCo`` on a real Manager
   (real lighthouse, one group) and taking one outer step; also the peak during that step.
4. Recovery: two groups; SIGKILL one, restart it at once, and time until its first committed outer step
   (it resumes from its checkpoint and heals from its peer).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402


# --- 1. slowdown -------------------------------------------------------------------------------------------
def slowdown(cfg: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """Interleaved round by round inside one run: with ``--checkpoint-every 2`` a checkpoint is written after
    every even outer step, so odd rounds (>= 3) train while one is being written and even rounds train
    while none is. Separate runs would compare different minutes of a shared, noisy machine."""
    args = [
        "--model",
        cfg["model"],
        "--seq-len",
        str(cfg["seq_len"]),
        "--batch-size",
        str(cfg["batch_size"]),
        "--sync-every",
        str(cfg["H"]),
        "--outer-steps",
        str(cfg["outer_steps"]),
        "--eval-batches",
        "0",
        "--group-wait",
        "0",
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "2",
    ]
    during: List[float] = []
    without: List[float] = []
    paired: List[float] = []  # a round during a write over the mean of its two neighbours without one
    for rep in range(cfg["reps"]):
        run = bl.Run(work / f"slow-{rep}", 1, args).wait(900)
        done = bl.committed(run.metrics[0])
        assert sum("checkpoint" in r for r in done) >= cfg["outer_steps"] // 2, "checkpoints were not written"
        tps = {r["outer_step"]: r["tokens_per_s"] for r in done}
        for k, v in tps.items():
            if k >= 3 and k % 2 == 1:
                during.append(v)
                if k - 1 in tps and k + 1 in tps:
                    paired.append(v / ((tps[k - 1] + tps[k + 1]) / 2))
            elif k >= 2 and k % 2 == 0:
                without.append(v)
    on, off = bl.median(during), bl.median(without)
    return {
        "tokens_per_s": {"rounds while a checkpoint is written": during, "rounds without": without},
        "paired_ratios": paired,
        "median_on": on,
        "median_off": off,
        "slowdown_pct": 100 * (1 - bl.median(paired)),
        "args": args,
    }


# --- 2. write throughput -----------------------------------------------------------------------------------
def _payload(cfg: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from torchx_diloco.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg["model"], block_size=cfg["seq_len"])
    return {
        "global_weights": {k: v.detach().clone() for k, v in model.named_parameters()},
        "momentum": {k: torch.randn_like(v) for k, v in model.named_parameters()},
    }


def _s3_root() -> Any:
    """A bucket on an in-process moto S3 server (what the tests use), or None without moto."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None
    import fsspec

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = f"http://{host}:{port}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
    return "s3://bench/throughput"


def throughput(cfg: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """Our writes against a raw ``fs.pipe_file`` of the same number of bytes to the same store, interleaved:
    a one-file part (``write_part``: torch.save streamed into the file, sha256 on a second thread) and a sharded
    part (``write_sharded_part`` in one process: DCP, every file hashed as written, manifest last); on local
    disk and on a real S3-protocol server (moto, in this process)."""
    import torch

    from torchx_diloco.checkpoint import CheckpointStore

    payload = _payload(cfg)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    roots = {"local disk": str(work / "throughput")}
    s3 = _s3_root()
    if s3 is not None:
        roots["S3 (moto)"] = s3
    rows: Dict[str, Any] = {}
    for where, root in roots.items():
        store = CheckpointStore(root, keep=1000)
        store.fs.makedirs(store.root, exist_ok=True)
        for kind in ("one file", "sharded"):
            ours, raw = [], []
            for rep in range(cfg["write_reps"]):
                for side in ("ours", "raw") if rep % 2 == 0 else ("raw", "ours"):
                    t = time.perf_counter()
                    if side == "raw":
                        store.fs.pipe_file(f"{store.root}/raw-{rep}.bin", data)
                        raw.append(time.perf_counter() - t)
                    elif kind == "one file":
                        store.write_part(rep, "global", payload)
                        ours.append(time.perf_counter() - t)
                    else:
                        store.write_sharded_part(rep, "global", payload, {"outer_step": rep}, None)
                        ours.append(time.perf_counter() - t)
                store.fs.rm(store.step_dir(rep), recursive=True)
                store.fs.rm_file(f"{store.root}/raw-{rep}.bin")
            mo, mr = bl.median(ours), bl.median(raw)
            rows[f"{kind}, {where}"] = {
                "bytes": len(data),
                "ours_s": ours,
                "raw_s": raw,
                "ours_mb_s": len(data) / mo / 1e6,
                "raw_mb_s": len(data) / mr / 1e6,
                "ratio_pct": 100 * mr / mo,
            }
    return {"bytes": len(data), "rows": rows, "ratio_pct": min(r["ratio_pct"] for r in rows.values())}


def throughput_rows(thr: Dict[str, Any]) -> List[List[str]]:
    return [
        [
            f"checkpoint write vs raw fs.pipe_file ({name})",
            f"{r['ratio_pct']:.0f}%",
            f"{r['ours_mb_s']:.0f} vs {r['raw_mb_s']:.0f} MB/s for {r['bytes'] / 1e6:.0f} MB; medians of "
            f"{len(r['ours_s'])} interleaved",
            ">= 80%",
        ]
        for name, r in thr["rows"].items()
    ]


# --- 3. memory ---------------------------------------------------------------------------------------------
def _rss() -> int:
    """Resident bytes, after handing freed heap memory back to the OS (else the allocator's cache counts)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak-RSS counter (Linux >= 4.0)


def memory_probe(preset: str, seq_len: int, H: int, fragments: int = 1, overlap: int = 0) -> Dict[str, Any]:
    """Runs in a fresh process: model + optimizers (with state) first, then the Manager, then DiLoCo (with
    ``fragments`` P, a sync's flat buffer holds 1/P of the model; with ``overlap`` tau, it lives tau steps)."""
    import torch

    from torchx_diloco.cluster import build_manager
    from torchx_diloco.config import ClusterConfig
    from torchx_diloco.diloco import DiLoCo
    from torchx_diloco.model import build_model
    from torchx_diloco.train import build_optimizers

    torch.manual_seed(0)
    model = build_model(preset, block_size=seq_len)
    inner, outer = build_optimizers(model, inner_lr=4e-4, outer_lr=0.7, outer_momentum=0.9, weight_decay=0.1)
    x = torch.randint(0, 256, (2, seq_len))

    def inner_step() -> None:
        _, loss = model(x, x)
        loss.backward()
        inner.step()
        inner.zero_grad(set_to_none=True)

    inner_step()  # the inner optimizer's state exists before we measure
    rss_model = _rss()
    manager = build_manager(ClusterConfig(lighthouse=os.environ["TORCHFT_LIGHTHOUSE"]), torch.device("cpu"))
    inner_step()
    rss_manager = _rss()
    diloco = DiLoCo(manager, model, inner, outer, sync_every=H, fragments=fragments, overlap_steps=overlap)
    rss_built = _rss()
    commits, peak_sync = 0, 0
    for _ in range(2 * H + overlap):  # every fragment twice: the second round shows nothing more accumulates
        inner_step()
        before = _rss()
        _reset_hwm()
        commits += diloco.step()  # a sync starts (pseudo-gradient, all-reduce) or lands (outer step) here
        peak_sync = max(peak_sync, _hwm() - before)
    rss_after = _rss()
    manager.shutdown(wait=False)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    held = sum(t.numel() * t.element_size() for t in diloco.global_weights()) + sum(
        t.numel() * t.element_size() for st in outer.state.values() for t in st.values() if torch.is_tensor(t)
    )
    return {
        "preset": preset,
        "fragments": fragments,
        "overlap_steps": overlap,
        "param_bytes": param_bytes,
        "outer_steps_committed": commits,
        "manager_bytes": rss_manager - rss_model,
        "backup_over_params": (rss_built - rss_manager) / param_bytes,
        "diloco_bytes": rss_after - rss_manager,
        "diloco_over_params": (rss_after - rss_manager) / param_bytes,
        "tensors_held_over_params": held / param_bytes,
        "peak_during_sync_bytes": peak_sync,
        "peak_over_params": peak_sync / param_bytes,
    }


def memory(cfg: Dict[str, Any], work: Path) -> Dict[str, Any]:
    out = []
    for preset, (fragments, overlap) in ((p, f) for p in cfg["memory_models"] for f in ((1, 0), (4, 0), (4, 1))):
        lighthouse, url = bl.start_lighthouse(work, 1)
        try:
            env = bl.group_env(0, 1, url)
            r = subprocess.run(
                [bl.PYTHON, __file__, "--memory-probe", preset, str(cfg["seq_len"]), str(fragments), str(overlap)],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                cwd=bl.REPO,
            )
            if r.returncode != 0:
                raise RuntimeError(f"memory probe failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
        finally:
            lighthouse.kill()
    return {"models": out}


def memory_only(cfg: Dict[str, Any], work: Path, started: float) -> int:
    """The memory part alone: a table and benchmarks/results/memory.json."""
    try:
        mem = memory(cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        [
            m["preset"],
            m["fragments"],
            m["overlap_steps"],
            m["diloco_over_params"],
            m["backup_over_params"],
            m["tensors_held_over_params"],
            m["peak_over_params"],
            m["peak_during_sync_bytes"] / 1e6,
        ]
        for m in mem["models"]
    ]
    heads = ["model", "P", "tau", "DiLoCo adds (x params)", "backup", "tensors held", "sync peak", "sync peak MB"]
    print(bl.table(heads, rows, digits=2))
    bl.write_result("memory", {"config": cfg, **mem}, started)
    return 0


# --- 4. recovery -------------------------------------------------------------------------------------------
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", re.M)


def _first_commit_after(jsonl: Path, t: float) -> Any:
    return next((r for r in bl.read_metrics(jsonl) if r.get("committed") and r["time"] > t), None)


def recovery(cfg: Dict[str, Any], work: Path, from_checkpoint: bool) -> Dict[str, Any]:
    """``from_checkpoint``: the restarted group finds its own checkpoint of the last step; else it has none
    (checkpoints off) and must heal from its peer."""
    args = [
        "--model",
        "tiny",
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        "--sync-every",
        "5",
        "--outer-steps",
        "100000",
        "--eval-batches",
        "0",
        "--checkpoint-every",
        "1" if from_checkpoint else "100000000",
        "--min-replicas",
        "1",
    ]
    run = bl.Run(work / f"recovery-{from_checkpoint}", 2, args, min_replicas=1)
    samples = []
    try:
        jsonl = run.jsonl(1)
        for k in range(cfg["kills"]):
            deadline = time.monotonic() + 300
            base = len(bl.committed(bl.read_metrics(jsonl)))
            while len(bl.committed(bl.read_metrics(jsonl))) < base + 3:  # a few commits in steady state first
                if time.monotonic() > deadline or any(p.proc.poll() is not None for p in run.procs):
                    raise RuntimeError(f"the groups stopped committing:\n{run.procs[1].output()[-3000:]}")
                time.sleep(0.2)
            victim = run.procs[1]
            t_kill = time.time()
            victim.kill()
            run.procs[1] = run.start_group(1, args, tag=f"-restart{k}")
            while (first := _first_commit_after(jsonl, t_kill)) is None:
                if time.monotonic() > deadline or run.procs[1].proc.poll() is not None:
                    raise RuntimeError(f"the restarted group did not commit:\n{run.procs[1].output()[-3000:]}")
                time.sleep(0.05)
            log = run.procs[1].output()
            time.sleep(1.0)  # let the survivor log its next commits
            survivor = [
                r["time"]
                for r in bl.committed(bl.read_metrics(run.jsonl(0)))
                if t_kill - 2 <= r["time"] <= first["time"] + 1
            ]
            pause = max((b - a for a, b in zip(survivor, survivor[1:], strict=False)), default=None)
            samples.append(
                {
                    "kill_to_first_commit_s": first["time"] - t_kill,
                    "outer_step": first["outer_step"],
                    "resumed_from_checkpoint": "resumed from" in log,
                    "healed_from_peer": "healed from a peer" in log,
                    "survivor_longest_pause_s": pause,
                }
            )
            print(
                f"  kill {k}: first committed outer step {first['outer_step']} "
                f"{first['time'] - t_kill:.1f}s after SIGKILL"
            )
    finally:
        run.close()
    return {
        "samples": samples,
        "median_s": bl.median(s["kill_to_first_commit_s"] for s in samples),
        "survivor_pause_median_s": bl.median(s["survivor_longest_pause_s"] for s in samples),
        "args": args,
    }


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--memory-probe":
        fragments, overlap = int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(memory_probe(sys.argv[2], int(sys.argv[3]), H=8, fragments=fragments, overlap=overlap)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the short version (default)")
    p.add_argument("--full", action="store_true", help="more repetitions, a larger model for memory")
    p.add_argument("--memory-only", action="store_true", help="just the host memory part (P=1, P=4, P=4 tau=1)")
    p.add_argument("--throughput-only", action="store_true", help="just the checkpoint write throughput part")
    a = p.parse_args()
    started = time.time()
    cfg = dict(
        model="small",
        seq_len=64,
        batch_size=4,
        H=10,
        outer_steps=20,
        reps=1,
        write_reps=6,
        memory_models=["small"],
        kills=2,
    )
    if a.full:
        cfg.update(outer_steps=30, reps=2, write_reps=10, memory_models=["small", "medium"], kills=5)
    print(f"benchmark 4: durability and recovery costs (model {cfg['model']})")
    work = Path(tempfile.mkdtemp(prefix="bench_durability-"))
    if a.memory_only:
        return memory_only(cfg, work, started)
    if a.throughput_only:
        try:
            thr = throughput(cfg, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(bl.table(["cost", "measured", "detail", "goal"], throughput_rows(thr)))
        bl.write_result("durability-throughput", {"config": cfg, "throughput": thr}, started)
        return 0
    try:
        slow = slowdown(cfg, work)
        print(f"  slowdown: {slow['median_on']:.0f} vs {slow['median_off']:.0f} tok/s")
        thr = throughput(cfg, work)
        mem = memory(cfg, work)
        rec = {"own checkpoint": recovery(cfg, work, True), "peer only": recovery(cfg, work, False)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        [
            "inner-loop slowdown while a checkpoint is written",
            f"{slow['slowdown_pct']:.1f}%",
            f"median of {len(slow['paired_ratios'])} rounds against their neighbours; medians "
            f"{slow['median_on']:.0f} vs {slow['median_off']:.0f} tokens/s",
            "<= 5%",
        ],
    ]
    rows += throughput_rows(thr)
    for m in mem["models"]:
        rows.append(
            [
                f"host memory DiLoCo adds ({m['preset']}, {m['param_bytes'] / 1e6:.0f} MB params, "
                f"P={m.get('fragments', 1)} tau={m.get('overlap_steps', 0)})",
                f"{m['diloco_over_params']:.2f}x params",
                f"backup alone {m['backup_over_params']:.2f}x; tensors held {m['tensors_held_over_params']:.2f}x; "
                f"a sync transiently adds {m['peak_over_params']:.2f}x; Manager {m['manager_bytes'] / 1e6:.0f} MB",
                "~2x",
            ]
        )
    for how, r in rec.items():
        rows.append(
            [
                f"SIGKILL to first committed outer step after restart ({how})",
                f"{r['median_s']:.1f} s",
                f"median of {len(r['samples'])}; resumed from checkpoint: "
                f"{all(s['resumed_from_checkpoint'] for s in r['samples'])}, healed from peer: "
                f"{all(s['healed_from_peer'] for s in r['samples'])}; survivor paused "
                f"{bl.fmt(r['survivor_pause_median_s'], 1)} s",
                "-",
            ]
        )
    print(bl.table(["cost", "measured", "detail", "goal"], rows))
    bl.write_result(
        "durability",
        {
            "config": cfg,
            "slowdown": slow,
            "throughput": thr,
            "memory": mem,
            "recovery": rec,
            "goals": {
                "slowdown<=5%": slow["slowdown_pct"] <= 5,
                "throughput>=80%": thr["ratio_pct"] >= 80,
                "memory~2x": all(1.5 <= m["diloco_over_params"] <= 2.5 for m in mem["models"]),
            },
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
