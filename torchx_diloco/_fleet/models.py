"""Models for the fleet's runs, by ``--model torchx_diloco._fleet.models:<factory>``."""

from __future__ import annotations

import os
import time
from typing import Any, Sequence, Union

import torch.nn as nn

from torchx_diloco.model import GPT
from torchx_diloco.presets import PRESETS, GPTConfig

PerGroupValue = Union[float, Sequence[float]]


def _this_groups(value: PerGroupValue) -> float:
    """One value for every group, or one per group picked by REPLICA_GROUP_ID (benchmarks' groups of other speeds)."""
    if isinstance(value, (int, float)):
        return float(value)
    return float(value[int(os.environ.get("REPLICA_GROUP_ID", "0"))])


def paced_nano(
    step_s: PerGroupValue = 0.015, block_size: int = 32, stall_s: PerGroupValue = 0.0, stall_at: int = 0
) -> nn.Module:
    """The nano GPT, each training forward taking at least ``step_s`` (a floor, not a delay: a slow machine pads
    nothing). Runs whose test acts on wall-clock time (the chaos harness kills a worker only while enough of the run
    is left for it to come back) then last about as long on a fast CPU as on a slow one.

    For benchmarks only (benchmarks/bench_unlike.py): ``step_s`` one per group makes groups of other speeds without
    spending cores (the floor sleeps); ``stall_s`` makes the ``stall_at``-th training forward wait that long once
    (a straggler)."""
    model = GPT(GPTConfig(**{**PRESETS["nano"].to_dict(), "block_size": block_size}))
    floor, stall = _this_groups(step_s), _this_groups(stall_s)
    last, forwards = [0.0], [0]

    def pace(module: nn.Module, args: Any) -> None:
        if module.training:
            forwards[0] += 1
            if stall > 0 and forwards[0] == stall_at:
                time.sleep(stall)
            wait = last[0] + floor - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            last[0] = time.monotonic()

    model.register_forward_pre_hook(pace)
    return model
