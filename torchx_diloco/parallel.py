"""How the ranks of one replica group train its model between syncs: alone, DDP, or FSDP2.

The counterpart of torchtitan's ``distributed/``: :func:`parallelize` starts the group's process group (on
this life's keys of torchrun's store), wraps the model and makes the process group DiLoCo's all-gather of
summed slices runs on (DDP); :func:`reshard` undoes what an evaluation leaves gathered under FSDP2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.nn as nn

from torchx_diloco.cluster import group_world_size, init_group_process_group


@dataclass
class Parallelized:
    """The group's model as it trains, and the process group its ranks split the pseudo-gradient over."""

    module: nn.Module  # the model, DDP of it, or the model sharded in place by FSDP2
    split_group: Optional[Any] = None  # ddp with several ranks: each sends 1/G of the pseudo-gradient across groups


def parallelize(model: nn.Module, parallel: str, device: torch.device, collective_timeout_s: float) -> Parallelized:
    """Several ranks in one group (e.g. one per GPU) train as DDP, or FSDP2 (``parallel``), between syncs; one
    rank trains the model as it is (FSDP2 over a world of one when asked for, so the layout is the same)."""
    if group_world_size() == 1 and parallel == "ddp":
        return Parallelized(model)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # NCCL's own collectives (barrier, objects) use the current device
        torch.cuda.set_device(device)
    if "MASTER_ADDR" in os.environ:  # torchrun's
        init_group_process_group(backend)
    elif not dist.is_initialized():  # fsdp in a one-rank group started by hand: a world of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if parallel == "fsdp":
        return Parallelized(shard_model(model))
    # DiLoCo's all-gather runs beside DDP's all-reduces (overlapped syncs): a process group of its own
    split = dist.new_group(backend=backend, timeout=timedelta(seconds=collective_timeout_s))
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Parallelized(ddp, split)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 over the group's ranks: each repeated block (a child of an ``nn.ModuleList``: a GPT's or a Hugging
    Face model's layers) is one unit, the rest (embeddings, head) the root's. Returns the same module."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)
    return model


def reshard(model: nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward (an evaluation): shard them
    again, or the model lists the gathered tensors instead of the parameters the optimizers hold (and a
    checkpoint of the optimizers' state by parameter name fails)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
