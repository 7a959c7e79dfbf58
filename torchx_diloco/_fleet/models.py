"""Models for the fleet's runs, by ``--model torchx_diloco._fleet.models:<factory>``."""

from __future__ import annotations

import time
from typing import Any

import torch.nn as nn

from torchx_diloco.model import GPT
from torchx_diloco.presets import PRESETS, GPTConfig


def paced_nano(step_s: float = 0.015, block_size: int = 32) -> nn.Module:
    """The nano GPT, each training forward taking at least ``step_s`` (a floor, not a delay: a slow machine pads
    nothing). Runs whose test acts on wall-clock time (the chaos harness kills a worker only while enough of the run
    is left for it to come back) then last about as long on a fast CPU as on a slow one."""
    model = GPT(GPTConfig(**{**PRESETS["nano"].to_dict(), "block_size": block_size}))
    last = [0.0]

    def pace(module: nn.Module, args: Any) -> None:
        if module.training:
            wait = last[0] + step_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            last[0] = time.monotonic()

    model.register_forward_pre_hook(pace)
    return model
