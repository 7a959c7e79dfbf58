"""The CUDA paths in one go (``scripts/gpu-check.sh``): the codecs on the GPU, then real ``torchx run`` jobs.

1. Codecs: round-trip error of bf16, int8, int4, int2 and topk on a pseudo-gradient-like tensor (heavy-tailed,
   one outlier), against each codec's own bound, and encode + decode times on the device; CPU and GPU must agree
   (int2's and topk's magnitudes are means, which a GPU may sum in another order: a last-bit difference there
   is not a fault, as each group decodes every payload alike).
2. One group on the GPU through ``torchx run diloco.diloco`` (an NCCL world of one, so every collective of the
   quantized reduce-scatter and all-gather runs on NCCL): blocking fp32 vs streaming (P=4, tau=1) int8, with
   the seconds each sync held training (``sync_s``) and tokens/s, from the metrics.
3. One group with FSDP2 over every visible GPU (``--parallel fsdp``), end to end through ``torchx run``.

``--device cpu`` runs the same on CPU (Gloo), to try the script where no GPU is. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from torchx_diloco._fleet.testing import committed, metrics_url, read_metrics  # noqa: E402
from torchx_diloco.codecs import BLOCK, get_codec  # noqa: E402

QMAX = {"int8": 127, "int4": 7}


def pseudo_gradient(numel: int, device: str) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((numel,)) * 1e-3  # heavy tails, like real updates
    x[numel // 3] = 0.5  # one outlier: it may coarsen its block only
    return x.to(device)


def time_it(fn: Any, device: str, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_codecs(device: str, numel: int) -> List[Dict[str, Any]]:
    x = pseudo_gradient(numel, device)
    rows = []
    for name in ("bf16", "int8", "int4", "int2", "topk"):
        codec = get_codec(name)
        y = codec.round_trip(x)
        error = (y - x).abs()
        relative = float(error.norm() / x.norm())
        within = True
        if name in QMAX:
            steps = x.view(-1, BLOCK).abs().amax(dim=1) / QMAX[name]
            within = bool((error.view(-1, BLOCK) <= steps[:, None] / 2 + 1e-12).all())
        same_on_cpu = torch.equal(codec.round_trip(x.cpu()), y.cpu())
        seconds = time_it(lambda c=codec: c.decode(c.encode(x), x.numel()), device)
        rows.append(
            {
                "codec": name,
                "relative_error": relative,
                "within_half_step": within,
                "same_as_cpu": same_on_cpu,
                "encode_decode_ms": 1000 * seconds,
                "GB_per_s": 4 * numel / seconds / 1e9,
            }
        )
    return rows


def torchx_run(work: Path, name: str, component_args: List[str], train_args: List[str]) -> Dict[str, Any]:
    """One ``torchx run -s local_cwd diloco.diloco`` to the end; its committed metrics."""
    ckpt = work / name
    argv = [
        str(Path(sys.executable).parent / "torchx"),
        "run",
        "-s",
        "local_cwd",
        "-cfg",
        f"log_dir={work / 'logs'}",
        "diloco.diloco",
        "--replica_groups",
        "1",
        "--checkpoint_dir",
        str(ckpt),
        "--lighthouse_idle_exit",
        "5",
        *component_args,
        "--",
        *train_args,
    ]
    started = time.monotonic()
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    records = committed(read_metrics(metrics_url(ckpt, 0))) if (ckpt / "metrics").exists() else []
    return {
        "name": name,
        "rc": out.returncode,
        "wall_s": time.monotonic() - started,
        "outer_steps": len(records),
        "sync_s_median": statistics.median([r["sync_s"] for r in records]) if records else None,
        "tokens_per_s_median": statistics.median([r["tokens_per_s"] for r in records]) if records else None,
        "tail": "" if out.returncode == 0 else (out.stdout + out.stderr)[-2000:],
    }


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--numel", type=int, default=1 << 24, help="values in the codec check (default 16M)")
    p.add_argument("--model", default="small", help="GPT preset of the torchx runs (default small)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible here: nothing to check (use --device cpu to try the script)")
        return 2
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    result: Dict[str, Any] = {"device": args.device, "gpus": gpus, "torch": torch.__version__}
    if args.device == "cuda":
        result["gpu_name"] = torch.cuda.get_device_name(0)

    result["codecs"] = check_codecs(args.device, args.numel)
    print(f"{'codec':6} {'rel. error':>10} {'<= half step':>12} {'= CPU':>6} {'enc+dec ms':>10} {'GB/s':>6}")
    for r in result["codecs"]:
        print(
            f"{r['codec']:6} {r['relative_error']:10.2e} {str(r['within_half_step']):>12} "
            f"{str(r['same_as_cpu']):>6} {r['encode_decode_ms']:10.2f} {r['GB_per_s']:6.1f}"
        )

    common = ["--model", args.model, "--device", args.device, "--sync-every", "20"]
    gpu_args = ["--gpus_per_group", "1"] if args.device == "cuda" else []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        runs = [
            torchx_run(work, "blocking-fp32", gpu_args, [*common, "--outer-steps", "8"]),
            torchx_run(
                work,
                "streaming-int8",
                gpu_args,
                [*common, "--outer-steps", "32", "--fragments", "4", "--overlap-steps", "1", "--codec", "int8"],
            ),
            torchx_run(
                work,
                "fsdp",
                ["--gpus_per_group", str(max(gpus, 1))] if args.device == "cuda" else ["--cpu", "2"],
                [*common, "--outer-steps", "8", "--parallel", "fsdp", "--codec", "int4"],
            ),
        ]
    result["runs"] = runs
    print(f"\n{'torchx run':16} {'rc':>3} {'steps':>5} {'sync_s':>8} {'tokens/s':>10} {'wall s':>7}")
    for r in runs:
        sync = f"{r['sync_s_median']:.3f}" if r["sync_s_median"] is not None else "-"
        tps = f"{r['tokens_per_s_median']:.0f}" if r["tokens_per_s_median"] is not None else "-"
        print(f"{r['name']:16} {r['rc']:3d} {r['outer_steps']:5d} {sync:>8} {tps:>10} {r['wall_s']:7.1f}")
        if r["rc"] != 0:
            print(r["tail"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    ok = all(r["within_half_step"] for r in result["codecs"]) and all(r["rc"] == 0 for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
