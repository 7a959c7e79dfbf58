"""Training data, one disjoint shard per replica group (split again among its ranks), batches addressable by index.

Two kinds of ``--data``: UTF-8 text (``pydoc``, or files: their bytes are the tokens, vocab 256), and
pre-tokenized token shards (``.bin``: raw ``uint16``/``uint32`` as nanoGPT writes them, or with llm.c's
256-int32 header; ``.npy``: 1-D ``uint16``/``uint32``/``int32``/``int64``), one file, a directory or a glob on
any fsspec URL. Shards are memory-mapped, never read whole: a batch slices the maps and converts only its rows.
Remote shards are first copied to a local cache (``simplecache::``, which a plain ``s3://`` URL gets by
default). The files of a ``--data`` are one virtual token stream, in name order; a window may cross from one
file into the next (as in one concatenated nanoGPT ``train.bin``).

A batch is a pure function of (seed, group, rank, batch index), so a group's position in its data is one integer:
resuming means restoring that integer, and no sampler state has to travel in a checkpoint.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any, Optional, Sequence, Union

import fsspec
import numpy as np
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from torchx_diloco.config import DEFAULT_DATA
from torchx_diloco.errors import UserError

EVAL_FRACTION = 0.05
TOKEN_SUFFIXES = (".bin", ".npy")
META_NAME = "meta.json"  # written by torchx_diloco.prepare beside the shards
META_FORMAT = "torchx-diloco-tokens"
LLMC_MAGIC = 20240520  # llm.c's data file header: magic, version (1: uint16, 2: uint32), token count
LLMC_HEADER_INTS = 256
LLMC_VERSIONS: dict[int, np.dtype] = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}
NPY_DTYPES = tuple(np.dtype(t) for t in (np.uint16, np.uint32, np.int32, np.int64))
BIN_DTYPES: dict[str, np.dtype] = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}
BYTE_VOCAB = 256
_SCAN_CHUNK = 1 << 24  # tokens per step when a vocab size has to be found by scanning


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
            raise UserError(
                f"--data {url!r}: {f.path} is a directory; pass files or a glob like DIR/*.txt "
                "(or a directory of .bin/.npy token shards)"
            ) from e
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


# --- a virtual token stream over several arrays ---------------------------------------------------------------
class TokenStream:
    """1-D token arrays (memory maps, for files) read as one stream, in order; ``view`` cuts without copying."""

    def __init__(self, parts: Sequence[np.ndarray], start: int = 0, length: Optional[int] = None) -> None:
        self.parts = list(parts)
        self.bounds = np.cumsum([0] + [len(p) for p in self.parts])  # part i holds [bounds[i], bounds[i+1])
        self.start = start
        self.length = int(self.bounds[-1]) - start if length is None else length

    def __len__(self) -> int:
        return self.length

    def view(self, start: int, stop: int) -> "TokenStream":
        return TokenStream(self.parts, self.start + start, stop - start)

    def window(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int64 (a copy of just those), across part boundaries."""
        if start < 0 or start + n > self.length:
            raise IndexError(f"window [{start}, {start + n}) outside a stream of {self.length} tokens")
        pos, out = self.start + start, []
        i = int(np.searchsorted(self.bounds, pos, side="right")) - 1
        while n > 0:
            lo = pos - int(self.bounds[i])
            piece = self.parts[i][lo : lo + n]
            out.append(np.asarray(piece, dtype=np.int64))
            pos, n, i = pos + len(piece), n - len(piece), i + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def max_token(self) -> int:
        """The largest token id, by a scan in chunks (reads all the data once; memory stays flat)."""
        best = -1
        for s in range(0, self.length, _SCAN_CHUNK):
            best = max(best, int(self.window(s, min(_SCAN_CHUNK, self.length - s)).max()))
        return best


def as_stream(tokens: Union[TokenStream, torch.Tensor, np.ndarray]) -> TokenStream:
    if isinstance(tokens, TokenStream):
        return tokens
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.numpy()
    return TokenStream([tokens])


# --- token shards ---------------------------------------------------------------------------------------------
def is_token_data(url: str) -> bool:
    """Token shards (``.bin``/``.npy`` files, a glob of them, or a directory), not text."""
    if url == DEFAULT_DATA:
        return False
    if url.rstrip("/").endswith(TOKEN_SUFFIXES):
        return True
    try:
        fs, path = url_to_fs(url)
        if any(c in path for c in "*?["):  # a glob: shards if any match is one (the reader rejects a mixture)
            return any(p.endswith(TOKEN_SUFFIXES) for p in fs.glob(path))
        return bool(fs.isdir(path))
    except Exception:  # noqa: BLE001 - not ours to judge here: the text reader says what is wrong
        return False


def _cached_url(url: str) -> str:
    """A remote URL read through fsspec's local cache (memory maps need local files); chained URLs as given."""
    if "::" in url:
        return url
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return url if protocol in ("file", "local") else f"simplecache::{url}"


def _local_path(fs: Any, path: str, flag: str, url: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    try:
        with fs.open(path, "rb") as f:  # a caching filesystem copies the file here and opens the local copy
            local = getattr(f, "name", None)
    except FileNotFoundError as e:
        raise UserError(f"{flag} {url!r}: {path} does not exist; pass existing token shards") from e
    except Exception as e:  # noqa: BLE001 - any fsspec failure becomes one line for the user
        raise UserError(
            f"{flag} {url!r}: cannot copy {path} to a local file ({type(e).__name__}: {e}); "
            f"read it through the local cache: simplecache::{url.split('::')[-1]}"
        ) from e
    if not isinstance(local, str) or not os.path.isfile(local):
        raise UserError(
            f"{flag} {url!r}: {path} is not a local file and cannot be memory-mapped; "
            f"read it through the local cache: simplecache::{url.split('::')[-1]}"
        )
    return local


def _map_file(local: str, name: str, meta_dtype: Optional[np.dtype], flag: str, url: str) -> np.ndarray:
    """A read-only memory map of one shard (its header, if any, skipped)."""
    size = os.path.getsize(local)
    if size == 0:
        raise UserError(f"{flag} {url!r}: {name} is empty; remove it or regenerate the shards")
    if name.endswith(".npy"):
        try:
            arr = np.load(local, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise UserError(f"{flag} {url!r}: {name} is not a readable .npy array ({e}); regenerate it") from e
        if arr.ndim != 1 or arr.dtype not in NPY_DTYPES:
            raise UserError(
                f"{flag} {url!r}: {name} holds a {arr.ndim}-D {arr.dtype} array; a token shard is 1-D "
                "uint16, uint32, int32 or int64: flatten or convert it"
            )
        return arr
    with open(local, "rb") as fh:
        head = np.frombuffer(fh.read(LLMC_HEADER_INTS * 4), dtype=np.int32)
    if len(head) >= 3 and head[0] == LLMC_MAGIC:
        dtype = LLMC_VERSIONS.get(int(head[1]))
        if dtype is None:
            raise UserError(f"{flag} {url!r}: {name} has an llm.c header of unknown version {head[1]}; expected 1 or 2")
        count = int(head[2])
        if size != LLMC_HEADER_INTS * 4 + count * dtype.itemsize:
            raise UserError(
                f"{flag} {url!r}: {name}'s llm.c header says {count} tokens but the file has "
                f"{size - LLMC_HEADER_INTS * 4} bytes of them; the file is truncated: regenerate it"
            )
        if meta_dtype is not None and meta_dtype != dtype:
            raise UserError(
                f"{flag} {url!r}: {META_NAME} says {meta_dtype} but {name}'s header says {dtype}; fix {META_NAME}"
            )
        if count == 0:
            raise UserError(f"{flag} {url!r}: {name} holds no tokens; remove it or regenerate the shards")
        return np.memmap(local, dtype=dtype, mode="r", offset=LLMC_HEADER_INTS * 4, shape=(count,))
    dtype = meta_dtype if meta_dtype is not None else BIN_DTYPES["uint16"]
    if size % dtype.itemsize:
        raise UserError(
            f"{flag} {url!r}: {name} has {size} bytes, not a whole number of {dtype} tokens; "
            f"fix the dtype in {META_NAME} or regenerate it"
        )
    return np.memmap(local, dtype=dtype, mode="r")


def open_tokens(url: str, flag: str = "--data") -> tuple[TokenStream, Optional[int]]:
    """The shards of ``url`` (file, directory or glob) as one stream, and the vocab size its meta JSON gives."""
    try:
        fs, path = url_to_fs(_cached_url(url))
        if any(c in path for c in "*?["):
            paths = sorted(fs.glob(path))
            if not paths:
                raise UserError(f"{flag} {url!r}: no file matches; pass existing token shards")
            base = posixpath.dirname(paths[0])
        elif fs.isdir(path):
            paths = sorted(p for p in fs.ls(path, detail=False) if p.endswith(TOKEN_SUFFIXES))
            base = path.rstrip("/")
            if not paths:
                what = "an empty directory" if not fs.ls(path, detail=False) else "a directory"
                raise UserError(
                    f"{flag} {url!r}: {path} is {what}; pass files or a glob like DIR/*.txt (text), or a "
                    "directory of .bin/.npy token shards (python -m torchx_diloco.prepare writes one)"
                )
        elif fs.exists(path):
            paths, base = [path], posixpath.dirname(path)
        else:
            raise UserError(f"{flag} {url!r}: {path} does not exist; pass existing token shards")
        bad = [p for p in paths if not p.endswith(TOKEN_SUFFIXES)]
        if bad:
            raise UserError(f"{flag} {url!r}: {bad[0]} is not a .bin or .npy token shard; pass only shards")
        meta_path = posixpath.join(base, META_NAME)
        meta = json.loads(fs.cat_file(meta_path)) if fs.exists(meta_path) else None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any fsspec failure becomes one line for the user
        raise UserError(f"{flag} {url!r}: cannot read ({type(e).__name__}: {e}); pass existing token shards") from e
    meta_dtype, listed, vocab = _check_meta(meta, flag, url)
    parts = []
    for p in paths:
        name = posixpath.basename(p)
        arr = _map_file(_local_path(fs, p, flag, url), name, meta_dtype, flag, url)
        if listed is not None:
            if name not in listed:
                raise UserError(
                    f"{flag} {url!r}: {name} is not among the shards {META_NAME} lists; "
                    f"remove it or regenerate {META_NAME}"
                )
            if listed[name] != len(arr):
                raise UserError(
                    f"{flag} {url!r}: {META_NAME} says {name} holds {listed[name]} tokens, the file {len(arr)}; "
                    "regenerate the shards or fix the JSON"
                )
        parts.append(arr)
    return TokenStream(parts), vocab


def _check_meta(meta: Any, flag: str, url: str) -> tuple[Optional[np.dtype], Optional[dict], Optional[int]]:
    """(dtype, {file: tokens}, vocab size) from a meta JSON, each None where it says nothing."""
    if meta is None:
        return None, None, None
    if not isinstance(meta, dict):
        raise UserError(f"{flag} {url!r}: {META_NAME} is not a JSON object; regenerate it")
    dtype = meta.get("dtype")
    if dtype is not None and dtype not in BIN_DTYPES:
        raise UserError(f"{flag} {url!r}: {META_NAME} names dtype {dtype!r}; use uint16 or uint32")
    vocab = meta.get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or vocab < 1):
        raise UserError(f"{flag} {url!r}: {META_NAME} names vocab_size {vocab!r}; use a positive integer")
    shards = meta.get("shards")
    listed = None
    if shards is not None:
        try:
            listed = {str(s["file"]): int(s["tokens"]) for s in shards}
        except (TypeError, KeyError, ValueError) as e:
            raise UserError(
                f"{flag} {url!r}: {META_NAME}'s shards are not a list of {{file, tokens}}; regenerate it"
            ) from e
    return (BIN_DTYPES[dtype] if dtype else None), listed, vocab


# --- the corpus -----------------------------------------------------------------------------------------------
class Corpus:
    """Tokens split into a held-out part (eval: ``--eval-data``, or the tail) and per-group training shards."""

    def __init__(self, train: TokenStream, eval: TokenStream, vocab_size: Optional[int] = None) -> None:
        self.train, self.eval = train, eval
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        """Text: 256 (bytes). Shards: their meta JSON's ``vocab_size``, else (slow: reads all the data once)
        the largest token id in them plus one."""
        if self._vocab_size is None:
            self._vocab_size = max(self.train.max_token(), self.eval.max_token()) + 1
        return self._vocab_size

    @classmethod
    def from_bytes(cls, data: bytes, seq_len: int) -> "Corpus":
        tokens = TokenStream([np.frombuffer(data, dtype=np.uint8)])
        return cls._tail_held_out(tokens, seq_len, BYTE_VOCAB, f"the corpus has {len(tokens)} bytes", "text")

    @classmethod
    def _tail_held_out(cls, tokens: TokenStream, seq_len: int, vocab: Optional[int], what: str, more: str) -> "Corpus":
        """The last ``EVAL_FRACTION`` of ``tokens`` held out for evaluation (at least one sequence), the rest to
        train on; too few tokens for that is one line (``what`` has N tokens, pass more ``more``)."""
        n_eval = max(int(len(tokens) * EVAL_FRACTION), seq_len + 1)
        if len(tokens) - n_eval < 2 * (seq_len + 1):
            raise UserError(f"{what}, too few for --seq-len {seq_len}: pass more {more} or a shorter --seq-len")
        return cls(tokens.view(0, len(tokens) - n_eval), tokens.view(len(tokens) - n_eval, len(tokens)), vocab)

    @classmethod
    def load(cls, data: str, seq_len: int, eval_data: Optional[str] = None) -> "Corpus":
        """``--data`` (text or token shards) and ``--eval-data`` (the same kinds; None: the tail of ``--data``)."""
        if is_token_data(data):
            train, vocab = open_tokens(data, "--data")
        elif eval_data is None:
            return cls.from_bytes(read_corpus(data), seq_len)
        else:
            train, vocab = TokenStream([np.frombuffer(read_corpus(data), dtype=np.uint8)]), BYTE_VOCAB
        if eval_data is None:
            return cls._tail_held_out(train, seq_len, vocab, f"--data {data!r} has {len(train)} tokens", "data")
        if is_token_data(eval_data):
            held, eval_vocab = open_tokens(eval_data, "--eval-data")
        else:
            held, eval_vocab = TokenStream([np.frombuffer(read_corpus(eval_data), dtype=np.uint8)]), BYTE_VOCAB
        if vocab is not None and eval_vocab is not None and vocab != eval_vocab:
            raise UserError(
                f"--eval-data {eval_data!r} has vocab size {eval_vocab}, --data {vocab}: "
                "tokenize both with the same tokenizer"
            )
        if len(held) < seq_len + 1:
            raise UserError(
                f"--eval-data {eval_data!r} has {len(held)} tokens, too few for --seq-len {seq_len}: "
                "pass more held-out data or a shorter --seq-len"
            )
        if len(train) < 2 * (seq_len + 1):
            raise UserError(
                f"--data {data!r} has {len(train)} tokens, too few for --seq-len {seq_len}: "
                "pass more data or a shorter --seq-len"
            )
        return cls(train, held, vocab if vocab is not None else eval_vocab)

    def shard(self, group: int, num_groups: int, seq_len: int, rank: int = 0, ranks: int = 1) -> "Shard":
        """Group ``group``'s contiguous, disjoint slice of the training part; with ``ranks`` ranks in the group,
        rank ``rank``'s contiguous part of it, so that the ranks' batches never repeat each other's tokens
        (one rank: the group's whole slice, as ever)."""
        size = len(self.train) // num_groups
        part = size // ranks
        if part < seq_len + 2:
            of, fewer = (f" of {ranks} ranks", " or ranks") if ranks > 1 else ("", "")
            raise UserError(
                f"the training data ({len(self.train)} tokens) is too short for {num_groups} groups{of} of "
                f"--seq-len {seq_len}: pass more data, fewer groups{fewer} or a shorter --seq-len"
            )
        start = group * size + rank * part
        return Shard(self.train.view(start, start + part))


class Shard:
    """One group's tokens; :meth:`batch` is a pure function of (seed, index) over them."""

    def __init__(self, tokens: Union[TokenStream, torch.Tensor, np.ndarray]) -> None:
        self.tokens = as_stream(tokens)

    def batch(self, index: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``index``: random windows drawn from a generator seeded by (seed, index)."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.tokens) - seq_len - 1, (batch_size,), generator=gen)
        rows = torch.from_numpy(np.stack([self.tokens.window(s, seq_len + 1) for s in starts.tolist()]))
        return rows[:, :-1], rows[:, 1:]


def eval_batches(
    tokens: Union[TokenStream, torch.Tensor], batch_size: int, seq_len: int, max_batches: int = 4
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, evenly spaced windows of the held-out tokens, the same in every group and every step."""
    stream = as_stream(tokens)
    windows = (len(stream) - 1) // seq_len
    n = min(windows, batch_size * max_batches)
    starts = torch.linspace(0, len(stream) - seq_len - 1, n).long().tolist()
    rows = torch.from_numpy(np.stack([stream.window(s, seq_len + 1) for s in starts]))
    for i in range(0, n, batch_size):
        chunk = rows[i : i + batch_size]
        yield chunk[:, :-1], chunk[:, 1:]
