"""Run every benchmark one after the other: ``python benchmarks/run_all.py [--quick | --full]``.

Each prints its table and writes benchmarks/results/<name>.json (benchmark 3 also loss_vs_tokens.png).
A failing benchmark is reported and the others still run; the exit code says whether all passed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "bench_vs_torchft",
    "bench_link",
    "bench_quality",
    "bench_durability",
    "bench_model_path",
    "bench_groups",
    "bench_codecs",
    "bench_unlike",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the short versions (default; 20 to 30 min on 2 cores)")
    mode.add_argument("--full", action="store_true", help="longer runs and more repetitions")
    p.add_argument("--only", action="append", choices=BENCHMARKS, help="run just these (repeatable)")
    a = p.parse_args()
    flag = "--full" if a.full else "--quick"
    failed = []
    for name in a.only or BENCHMARKS:
        t = time.time()
        print(f"\n=== {name} {flag} ===", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / f"{name}.py"), flag])
        print(f"=== {name}: exit {rc} after {time.time() - t:.0f}s ===", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
