"""Checkpointing, as one part: durable, verified steps on any fsspec URL.

- :mod:`~torchx_diloco.checkpoint.store`: ``CheckpointStore``, the step folders, manifests (written last),
  verification, pruning;
- :mod:`~torchx_diloco.checkpoint.dcp`: the sharded format of groups of several ranks (torch.distributed.checkpoint,
  every file hashed as written, a safe ``.metadata`` reader);
- :mod:`~torchx_diloco.checkpoint.writer`: the background writer;
- :mod:`~torchx_diloco.checkpoint._io`: what the two formats share (hashing stream, ``CorruptCheckpoint``).
"""

from torchx_diloco.checkpoint._io import CorruptCheckpoint
from torchx_diloco.checkpoint.store import (
    FORMAT_VERSION,
    GLOBAL_PART,
    Checkpoint,
    CheckpointStore,
    check_format,
    group_part,
)
from torchx_diloco.checkpoint.writer import AsyncWriter

__all__ = [
    "FORMAT_VERSION",
    "GLOBAL_PART",
    "AsyncWriter",
    "Checkpoint",
    "CheckpointStore",
    "CorruptCheckpoint",
    "check_format",
    "group_part",
]
