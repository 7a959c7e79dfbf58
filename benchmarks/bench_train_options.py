"""What ``--compile`` and ``--dtype bf16`` buy or cost on this machine: inner-step tokens/s of one group.

    python benchmarks/bench_train_options.py [--quick | --full] [--model tiny] [--threads 1]

The inner step exactly as the trainer takes it (train.py: forward and loss under ``torch.autocast`` for bf16,
the model wrapped by ``torch.compile`` for --compile, backward, gradient clipping, AdamW), without the
lighthouse: DiLoCo's sync does not depend on these flags. Four settings, measured interleaved (A B C D A B C D
...) so that a slow spell of the machine hits all of them alike; each measurement is ``--steps`` inner steps
after the warm-up, and the table gives the median tokens/s over the rounds, its ratio to fp32 eager's, and the
median of the per-round ratios (each round against fp32 eager of the same round: robust to a slow spell).
The one-off cost of compiling (the first steps of a --compile run) is reported apart.

One thread by default, as each replica group runs in tests and `make run` (testing.group_env).
Writes benchmarks/results/train_options.json (train_options-<model>.json for another --model).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List

import torch

from benchlib import median, ratio, table, write_result
from torchx_diloco.data import Corpus, read_corpus
from torchx_diloco.model import build_model
from torchx_diloco.train import build_optimizers

SETTINGS = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]


def name(dtype: str, compiled: bool) -> str:
    return f"{dtype} {'compile' if compiled else 'eager'}"


class Setting:
    """One (dtype, compile) pair: its own model (same initial weights), optimizer and data position."""

    def __init__(self, dtype: str, compiled: bool, a: argparse.Namespace, corpus: Corpus) -> None:
        torch.manual_seed(0)
        self.dtype, self.compiled, self.a = dtype, compiled, a
        self.model = build_model(a.model, block_size=a.seq_len)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.opt, _ = build_optimizers(self.model, 4e-4, 0.7, 0.9, 0.1)
        self.shard = corpus.shard(0, 1, a.seq_len)
        self.position = 0
        started = time.perf_counter()
        self.steps(a.warmup)  # the compile happens here
        self.warmup_s = time.perf_counter() - started

    def steps(self, n: int) -> float:
        """``n`` inner steps; their tokens/s."""
        a = self.a
        started = time.perf_counter()
        for _ in range(n):
            x, y = self.shard.batch(self.position, a.batch_size, a.seq_len, 0)
            self.position += 1
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
                _, loss = self.forward(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return n * a.batch_size * a.seq_len / (time.perf_counter() - started)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="nano model, 3 rounds (default; about a minute)")
    mode.add_argument("--full", action="store_true", help="tiny model, 5 rounds of 20 steps")
    p.add_argument("--model", help="GPT preset (default: nano for --quick, tiny for --full)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a replica group runs with 1)")
    a = p.parse_args()
    a.model = a.model or ("tiny" if a.full else "nano")
    a.rounds, a.steps, a.warmup = (5, 20, 5) if a.full else (3, 10, 3)
    a.batch_size, a.seq_len = 16, 128
    torch.set_num_threads(a.threads)
    started = time.time()

    corpus = Corpus.from_bytes(read_corpus("pydoc"), a.seq_len)
    settings = [Setting(d, c, a, corpus) for d, c in SETTINGS]
    samples: Dict[str, List[float]] = {name(s.dtype, s.compiled): [] for s in settings}
    for r in range(a.rounds):
        for s in settings:  # interleaved: A B C D, A B C D, ...
            samples[name(s.dtype, s.compiled)].append(s.steps(a.steps))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()), flush=True)

    base = samples[name("fp32", False)]
    rows: List[List[Any]] = []
    results: Dict[str, Any] = {}
    for s in settings:
        key = name(s.dtype, s.compiled)
        med = median(samples[key])
        # paired: each round against fp32 eager of the same round (a slow spell of the machine cancels out)
        per_round = [ratio(x, b) for x, b in zip(samples[key], base, strict=True)]
        rows.append([key, med, ratio(med, median(base)), median(per_round), s.warmup_s])
        results[key] = {
            "tokens_per_s": samples[key],
            "median_tokens_per_s": med,
            "vs_fp32_eager": ratio(med, median(base)),
            "vs_fp32_eager_per_round": per_round,
            "median_vs_fp32_eager_per_round": median(per_round),
            "warmup_s": s.warmup_s,
        }
    print(
        f"\nmodel {a.model}, batch {a.batch_size} x seq {a.seq_len}, {a.threads} thread(s), "
        f"{a.rounds} interleaved rounds of {a.steps} inner steps (after {a.warmup} warm-up steps)"
    )
    headers = ["setting", "median tokens/s", "vs fp32 eager", "per-round ratio (median)", f"first {a.warmup} steps (s)"]
    print(table(headers, rows))
    config = {k: getattr(a, k) for k in ("model", "threads", "rounds", "steps", "warmup", "batch_size", "seq_len")}
    default_model = "tiny" if a.full else "nano"
    name_ = "train_options" if a.model == default_model else f"train_options-{a.model}"
    write_result(name_, {"config": config, "results": results}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
