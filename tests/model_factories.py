"""Model factories for the tests of --model package.module:factory (imported by the trainer, by name)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from torchx_diloco.model import GPT
from torchx_diloco.presets import PRESETS, GPTConfig


def _nano(**overrides: Any) -> GPT:
    return GPT(GPTConfig(**{**PRESETS["nano"].to_dict(), "block_size": 32, **overrides}))


def seeded_by_group() -> nn.Module:
    """Different initial weights in every group: the trainer must make the groups agree."""
    torch.manual_seed(int(os.environ["REPLICA_GROUP_ID"]))
    return _nano()


def seeded_alike() -> nn.Module:
    """The weights group 0 gets from seeded_by_group, in every group."""
    torch.manual_seed(0)
    return _nano()


def raises(**kwargs: Any) -> nn.Module:
    raise ValueError("n_layer must be even")


def not_a_module() -> Any:
    return {"weights": torch.zeros(2)}


def bare_logits(vocab_size: int = 256, max_positions: int = 64) -> nn.Module:
    """A model returning bare logits, with learned positions (IndexError past max_positions)."""

    class Bigram(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(vocab_size, 32)
            self.pos = nn.Embedding(max_positions, 32)
            self.head = nn.Linear(32, vocab_size)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))

    return Bigram()


def raises_mid_run(after: int = 5) -> nn.Module:
    """A nano GPT whose ``after``-th training forward raises: an error in the middle of a run."""
    model = _nano()
    calls = [0]

    def count(module: nn.Module, args: Any) -> None:
        if module.training:
            calls[0] += 1
            if calls[0] >= after:
                raise RuntimeError("the model broke mid-run")

    model.register_forward_pre_hook(count)
    return model


def rank_dependent_dropout(dropout: float = 0.1) -> nn.Module:
    """A nano GPT with dropout whose random stream differs between the ranks of a group (each rank draws RANK
    numbers first), as any model drawing rank-dependent randomness makes it: a resume must give every rank its
    own RNG state back."""
    torch.rand(int(os.environ.get("RANK", "0")))
    return _nano(dropout=dropout)
