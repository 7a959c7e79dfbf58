"""The training module's flags and environment, validated into one ``TrainConfig``.

Environment (as in torchft's DiLoCo example; the TorchX components set them):
``REPLICA_GROUP_ID`` (0..N-1), ``NUM_REPLICA_GROUPS`` (N), ``TORCHFT_LIGHTHOUSE`` (http://host:port).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import List, Mapping, Optional
from urllib.parse import urlparse

from torchx_diloco.data import DEFAULT_DATA
from torchx_diloco.errors import UserError
from torchx_diloco.model import PRESETS

IMPLEMENTATIONS = ("torchx_diloco", "torchft")


@dataclass
class TrainConfig:
    replica_group_id: int
    num_replica_groups: int
    lighthouse: str
    outer_steps: int
    sync_every: int
    checkpoint_dir: str
    checkpoint_every: int
    keep_checkpoints: int
    data: str
    model: str
    batch_size: int
    seq_len: int
    seed: int
    inner_lr: float
    outer_lr: float
    outer_momentum: float
    weight_decay: float
    warmup_steps: Optional[int]
    max_grad_norm: float
    min_replicas: int
    lighthouse_timeout: float
    group_wait: float
    collective_timeout: float
    quorum_timeout: float
    device: str
    eval_batches: int
    impl: str

    @property
    def total_inner_steps(self) -> int:
        return self.outer_steps * self.sync_every


def _number(text: str, kind: type, ok, requirement: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text} must be {requirement}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, ">= 1")


def _non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, ">= 0")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "> 0")


def _unit_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "in [0, 1)")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line that names the fix, with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see python -m torchx_diloco.train --help)")


def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(f"{k} ({v.n_layer}x{v.n_embd})" for k, v in PRESETS.items())
    p = _OneLineParser(
        prog="python -m torchx_diloco.train",
        description="One DiLoCo replica group: inner AdamW steps, every H steps an outer SGD-Nesterov step on "
        "the pseudo-gradient averaged across groups through torchft. Reads REPLICA_GROUP_ID, "
        "NUM_REPLICA_GROUPS and TORCHFT_LIGHTHOUSE from the environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--outer-steps", type=_positive_int, default=10, help="outer steps (syncs) to train for")
    a("--sync-every", type=_positive_int, default=50, help="H: inner steps between syncs")
    a("--checkpoint-dir", default="checkpoints/diloco",
      help="fsspec URL of the durable backups (local path, memory://, s3://, gs://); a run resumes from the "
      "newest complete checkpoint found there")
    a("--checkpoint-every", type=_positive_int, default=1, help="write a checkpoint every k committed outer steps")
    a("--keep-checkpoints", type=_positive_int, default=3, help="how many checkpoints to keep")
    a("--data", default=DEFAULT_DATA,
      help="'pydoc' (Python's own docs, on every CPython) or an fsspec URL or glob of UTF-8 text files")
    a("--model", choices=sorted(PRESETS), default="tiny", help=f"GPT size preset: {presets}")
    a("--batch-size", type=_positive_int, default=16, help="sequences per inner step per group")
    a("--seq-len", type=_positive_int, default=128, help="tokens (bytes) per sequence")
    a("--seed", type=int, default=0, help="seeds the initial weights (same in every group) and the data order")
    a("--inner-lr", type=_positive_float, default=4e-4, help="AdamW peak learning rate (paper: 4e-4)")
    a("--outer-lr", type=_positive_float, default=0.7, help="outer SGD learning rate (paper: 0.7)")
    a("--outer-momentum", type=_unit_float, default=0.9, help="outer Nesterov momentum (paper: 0.9)")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (paper: 0.1)")
    a("--warmup-steps", type=_non_negative_int, default=None,
      help="inner warm-up steps before the cosine decay (default: 5%% of all inner steps, at most 1000)")
    a("--max-grad-norm", type=float, default=1.0, help="clip inner gradients to this norm (0 = off)")
    a("--min-replicas", type=_positive_int, default=1,
      help="groups needed to commit an outer step (the others may be down)")
    a("--lighthouse-timeout", type=_positive_float, default=60.0,
      help="seconds to wait for the lighthouse at start, and how long a sync keeps retrying while it is away "
      "(restarted lighthouse)")
    a("--group-wait", type=float, default=60.0,
      help="seconds to wait at start for all NUM_REPLICA_GROUPS groups to reach the lighthouse (0 = don't)")
    a("--collective-timeout", type=_positive_float, default=60.0,
      help="seconds an all-reduce, commit vote or peer checkpoint fetch may take before the round is dropped")
    a("--quorum-timeout", type=_positive_float, default=120.0,
      help="seconds one quorum may take: longer than the lighthouse's join timeout, so slow groups are waited for")
    a("--device", default="auto", help="'auto' (CUDA if visible, else CPU), 'cpu' or 'cuda'")
    a("--eval-batches", type=_non_negative_int, default=4, help="held-out batches per eval (0 = no eval)")
    a("--impl", choices=IMPLEMENTATIONS, default="torchx_diloco",
      help="whose outer loop runs: ours, or torchft.local_sgd.DiLoCo (for comparison)")
    return p


def _env_int(env: Mapping[str, str], name: str, default: Optional[str] = None) -> int:
    raw = env.get(name, default)
    if raw is None or raw == "":
        raise UserError(f"{name} is not set: set it (e.g. {name}=0) or launch through the TorchX component")
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not an integer: set it to a whole number") from None


def parse_lighthouse(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not parsed.port:
        raise UserError(
            f"TORCHFT_LIGHTHOUSE={url!r} is not a lighthouse URL: set it to http://HOST:PORT (e.g. http://localhost:29510)"
        )
    return url.rstrip("/")


def parse_config(argv: Optional[List[str]] = None, env: Optional[Mapping[str, str]] = None) -> TrainConfig:
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    num_groups = _env_int(env, "NUM_REPLICA_GROUPS", "1")
    if num_groups < 1:
        raise UserError(f"NUM_REPLICA_GROUPS={num_groups} must be >= 1")
    group_id = _env_int(env, "REPLICA_GROUP_ID", "0" if num_groups == 1 else None)
    if not 0 <= group_id < num_groups:
        raise UserError(
            f"REPLICA_GROUP_ID={group_id} is outside 0..{num_groups - 1}: set it below NUM_REPLICA_GROUPS={num_groups}"
        )
    if "TORCHFT_LIGHTHOUSE" not in env:
        raise UserError(
            "TORCHFT_LIGHTHOUSE is not set: start a lighthouse (python -m torchx_diloco.lighthouse) and set "
            "TORCHFT_LIGHTHOUSE=http://HOST:PORT, or launch through the TorchX component"
        )
    if args.min_replicas > num_groups:
        raise UserError(f"--min-replicas {args.min_replicas} exceeds NUM_REPLICA_GROUPS={num_groups}: lower it")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise UserError(f"--device {args.device!r}: use auto, cpu or cuda")
    return TrainConfig(
        replica_group_id=group_id,
        num_replica_groups=num_groups,
        lighthouse=parse_lighthouse(env["TORCHFT_LIGHTHOUSE"]),
        **{k: v for k, v in vars(args).items()},
    )
