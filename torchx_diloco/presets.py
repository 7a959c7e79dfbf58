"""The GPT size presets as plain data, importable without torch (the components validate ``--model`` with them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict

VOCAB_SIZE = 256  # byte-level tokens


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 256
    vocab_size: int = VOCAB_SIZE
    dropout: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# name -> shape (approximate parameter counts with the default block size)
PRESETS: Dict[str, GPTConfig] = {
    "nano": GPTConfig(n_layer=2, n_head=2, n_embd=64),  # ~0.1M: unit tests
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128),  # ~0.8M: the laptop default
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384),  # ~10.7M: benchmarks
    "medium": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # ~85M: one GPU per group
}
