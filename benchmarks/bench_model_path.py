"""What the generic model path costs: the trainer's loss for any model against the GPT's own built-in loss.

    python benchmarks/bench_model_path.py [--quick | --full] [--model tiny] [--threads 1]

Since ``--model`` takes any ``package.module:factory``, the trainer calls every model as ``model(x)`` and takes
the cross-entropy of whatever logits it returns (``modeling.forward_loss``: a Hugging Face output, a tuple, or
bare logits). Before that, it asked our GPT for its loss (``model(x, y)[1]``). Both sides here take the same
inner step (forward, loss, backward, clipping, AdamW) on two copies of one GPT with the same weights and
batches, interleaved (A B A B ...) so a slow spell of the machine hits both alike. The table gives the median
tokens/s over the rounds and the median of the per-round ratios; the losses of the last step must agree.

Writes benchmarks/results/model_path.json (model_path-<model>.json for another --model).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Callable, Dict, List

import torch

from benchlib import median, ratio, table, write_result
from torchx_diloco.data import Corpus, read_corpus
from torchx_diloco.model import build_model
from torchx_diloco.modeling import forward_loss
from torchx_diloco.train import build_optimizers

SIDES: Dict[str, Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "built-in loss: model(x, y)[1]": lambda model, x, y: model(x, y)[1],
    "generic path: forward_loss(model, x, y)": forward_loss,
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="7 rounds of 20 steps (default)")
    mode.add_argument("--full", action="store_true", help="15 rounds of 40 steps")
    p.add_argument("--model", default="tiny", help="GPT preset (default tiny)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as one replica group runs)")
    a = p.parse_args()
    a.rounds, a.steps = (15, 40) if a.full else (7, 20)
    return a


def main() -> int:
    started = time.time()
    a = parse()
    torch.set_num_threads(a.threads)
    corpus = Corpus.from_bytes(read_corpus("pydoc"), a.seq_len)
    shard = corpus.shard(0, 1, a.seq_len)
    torch.manual_seed(0)
    base = build_model(a.model, block_size=a.seq_len)
    sides = {}
    for name in SIDES:
        model = copy.deepcopy(base)
        inner, _ = build_optimizers(model, inner_lr=4e-4, outer_lr=0.7, outer_momentum=0.9, weight_decay=0.1)
        sides[name] = {"model": model, "opt": inner, "position": 0, "tps": [], "loss": None}

    def run(name: str, steps: int) -> float:
        side = sides[name]
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = shard.batch(side["position"], a.batch_size, a.seq_len, seed=0)
            side["position"] += 1
            loss = SIDES[name](side["model"], x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(side["model"].parameters(), 1.0)
            side["opt"].step()
            side["opt"].zero_grad(set_to_none=True)
            side["loss"] = float(loss)
        return steps * a.batch_size * a.seq_len / (time.perf_counter() - t0)

    for name in SIDES:
        run(name, 3)  # warm-up
    for _ in range(a.rounds):
        for name in SIDES:
            sides[name]["tps"].append(run(name, a.steps))
    builtin, generic = (sides[n] for n in SIDES)
    per_round = [g / b for g, b in zip(generic["tps"], builtin["tps"], strict=True)]
    rows: List[List[Any]] = [
        [name, median(side["tps"]), ratio(median(side["tps"]), median(builtin["tps"])), side["loss"]]
        for name, side in sides.items()
    ]
    print(
        f"\n{a.model} GPT, batch {a.batch_size} x {a.seq_len}, {a.threads} thread(s), {a.rounds} rounds x {a.steps}"
        " steps, interleaved"
    )
    print(table(["path", "tokens/s (median)", "vs built-in", "loss at the last step"], rows))
    print(f"median of the per-round ratios generic/built-in: {median(per_round):.3f}")
    write_result(
        "model_path" if a.model == "tiny" else f"model_path-{a.model}",
        {
            "settings": {k: getattr(a, k) for k in ("model", "batch_size", "seq_len", "threads", "rounds", "steps")},
            "tokens_per_s": {name: side["tps"] for name, side in sides.items()},
            "median_tokens_per_s": {name: median(side["tps"]) for name, side in sides.items()},
            "per_round_ratio_generic_over_builtin": per_round,
            "median_per_round_ratio": median(per_round),
            "last_loss": {name: side["loss"] for name, side in sides.items()},
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
