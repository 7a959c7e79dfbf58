"""Text corpora as byte tokens, one disjoint shard per replica group, batches addressable by index.

A batch is a pure function of (seed, group, batch index), so a group's position in its data is one integer:
resuming means restoring that integer, and no sampler state has to travel in a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import torch

from torchx_diloco.config import DEFAULT_DATA
from torchx_diloco.errors import UserError

EVAL_FRACTION = 0.05


def read_corpus(url: str) -> bytes:
    """The bytes of ``url``: ``pydoc``, or an fsspec URL or glob of UTF-8 text files (concatenated, sorted)."""
    if url == DEFAULT_DATA:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    try:
        files = fsspec.open_files(url, mode="rb")
    except Exception as e:  # noqa: BLE001 - any fsspec failure becomes one line for the user
        raise UserError(f"--data {url!r}: cannot open ({e}); pass an existing file, glob or fsspec URL") from e
    if not files:
        raise UserError(f"--data {url!r}: no file matches; pass an existing file, glob or fsspec URL")
    parts = []
    for f in sorted(files, key=lambda f: f.path):
        try:
            with f as fh:
                raw = fh.read()
        except FileNotFoundError as e:
            raise UserError(
                f"--data {url!r}: {f.path} does not exist; pass an existing file, glob or fsspec URL"
            ) from e
        except IsADirectoryError as e:
            raise UserError(f"--data {url!r}: {f.path} is a directory; pass files or a glob like DIR/*.txt") from e
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"--data {url!r}: {f.path} is not UTF-8 text (byte {e.start}); convert it or pass text files"
            ) from e
        parts.append(raw)
    data = b"\n\n".join(parts)
    if not data.strip():
        raise UserError(f"--data {url!r}: the text is empty; pass files with text in them")
    return data


@dataclass
class Corpus:
    """Byte tokens split into a held-out tail (eval) and a training part cut into per-group shards."""

    train: torch.Tensor
    eval: torch.Tensor

    @classmethod
    def from_bytes(cls, data: bytes, seq_len: int) -> "Corpus":
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        n_eval = max(int(len(tokens) * EVAL_FRACTION), seq_len + 1)
        if len(tokens) - n_eval < 2 * (seq_len + 1):
            raise UserError(
                f"the corpus has {len(tokens)} bytes, too few for --seq-len {seq_len}: "
                "pass more text or a shorter --seq-len"
            )
        return cls(train=tokens[:-n_eval], eval=tokens[-n_eval:])

    def shard(self, group: int, num_groups: int, seq_len: int) -> "Shard":
        """Group ``group``'s contiguous, disjoint slice of the training part."""
        size = len(self.train) // num_groups
        if size < seq_len + 1:
            raise UserError(
                f"the training text ({len(self.train)} bytes) is too short for {num_groups} groups of "
                f"--seq-len {seq_len}: pass more text, fewer groups or a shorter --seq-len"
            )
        return Shard(self.train[group * size : (group + 1) * size])


@dataclass
class Shard:
    tokens: torch.Tensor

    def batch(self, index: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``index``: random windows drawn from a generator seeded by (seed, index)."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.tokens) - seq_len - 1, (batch_size,), generator=gen)
        rows = torch.stack([self.tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()
        return rows[:, :-1], rows[:, 1:]


def eval_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int = 4
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, evenly spaced windows of the held-out text, the same in every group and every step."""
    windows = (len(tokens) - 1) // seq_len
    n = min(windows, batch_size * max_batches)
    starts = torch.linspace(0, len(tokens) - seq_len - 1, n).long().tolist()
    rows = torch.stack([tokens[s : s + seq_len + 1] for s in starts]).long()
    for i in range(0, n, batch_size):
        chunk = rows[i : i + batch_size]
        yield chunk[:, :-1], chunk[:, 1:]
