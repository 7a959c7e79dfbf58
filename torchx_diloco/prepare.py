"""Tokenize text into token shards the trainer reads: ``python -m torchx_diloco.prepare INPUT... --out URL``.

Inputs: text files (one document each), ``.jsonl`` (one document per line, its ``text`` field) and ``.parquet``
(its ``text`` column, read with pyarrow), as paths, globs or fsspec URLs; the kind comes from the file's suffix,
or from ``--kind`` for all inputs (``--kind text``: any UTF-8 file, e.g. ``.py`` sources). The tokenizer is a
Hugging Face ``tokenizers`` file (``tokenizer.json``) or ``bytes`` (UTF-8 bytes, vocab 256, what text ``--data``
trains on), or ``train:VOCAB``: a byte-level BPE of VOCAB tokens trained here on the inputs and saved beside the
shards (``tokenizer.json``, what ``python -m torchx_diloco.export --tokenizer`` takes). Documents are joined with
``--eot`` (a token of the tokenizer; a trained one's ``<|endoftext|>``) or, by default, the tokens of a blank line.

Output (local or any fsspec URL, e.g. ``s3://``): ``shard-00000.bin``, ... of at most ``--shard-tokens`` tokens
each, in llm.c's format (a 256-int32 header: magic 20240520, version 1 for uint16 / 2 for uint32, token count;
then the tokens), and ``meta.json`` (tokenizer, vocab size, dtype, token count, the shards), written last.
Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from collections.abc import Iterator
from typing import Any, Callable, List, Optional, Sequence

import fsspec
import numpy as np

from torchx_diloco.config import positive_int
from torchx_diloco.errors import UserError

PROG = "python -m torchx_diloco.prepare"
META_NAME = "meta.json"  # the same names as torchx_diloco.data, which imports torch: kept equal by a test
META_FORMAT = "torchx-diloco-tokens"
LLMC_MAGIC = 20240520
TEXT_SUFFIXES = (".txt", ".text", ".md")
KINDS = {**{s: "text" for s in TEXT_SUFFIXES}, ".jsonl": "jsonl", ".parquet": "parquet"}
AUTO = "auto"  # --kind's default: each input's kind from its suffix (KINDS)
TEXT_CHUNK = 1 << 20  # characters of a text file tokenized at a time (cut at a line end)
BATCH_DOCS = 256  # documents tokenized together (in parallel by tokenizers) ...
BATCH_CHARS = 16 << 20  # ... or fewer, up to this much text: memory stays bounded
TRAIN_PREFIX = "train:"  # --tokenizer train:VOCAB
TRAINED_NAME = "tokenizer.json"  # where a trained tokenizer is saved, in --out
EOT_TOKEN = "<|endoftext|>"  # a trained tokenizer's one special token, between documents
MIN_TRAINED_VOCAB = 260


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog=PROG,
        description="Tokenize text, .jsonl (a 'text' field) or .parquet (a 'text' column) into token shards "
        "(llm.c .bin format) and a meta.json, for --data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # --kin is a typo, not --kind
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files, globs or fsspec URLs (.txt/.md, .jsonl, .parquet; any UTF-8 text with --kind text)",
    )
    p.add_argument("--out", required=True, help="directory (local path or fsspec URL) for the shards and meta.json")
    p.add_argument(
        "--tokenizer",
        required=True,
        type=_tokenizer_spec,
        help="a Hugging Face tokenizers file (tokenizer.json), 'bytes' (vocab 256), or 'train:VOCAB': a byte-level "
        f"BPE of up to VOCAB tokens trained on the inputs, saved as OUT/{TRAINED_NAME}, {EOT_TOKEN} its end of text",
    )
    p.add_argument("--shard-tokens", type=positive_int, default=100_000_000, help="tokens per shard, at most")
    p.add_argument("--eot", default=None, help="a token of the tokenizer put between documents (default: a blank line)")
    p.add_argument("--text-field", default="text", help="the field (.jsonl) or column (.parquet) holding the text")
    p.add_argument(
        "--kind",
        choices=[AUTO, *sorted(set(KINDS.values()))],
        default=AUTO,
        help="how to read every input: by its suffix (auto), or all as UTF-8 text (one document per file: .py "
        "sources, .rst, any suffix), .jsonl or .parquet",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _tokenizer_spec(text: str) -> str:
    if text.startswith(TRAIN_PREFIX):
        size = text[len(TRAIN_PREFIX) :]
        if not size.isdigit() or int(size) < MIN_TRAINED_VOCAB:
            raise argparse.ArgumentTypeError(
                f"{text!r}: train:VOCAB needs a whole number of at least {MIN_TRAINED_VOCAB} (256 bytes and more)"
            )
    return text


# --- the tokenizer --------------------------------------------------------------------------------------------
class Tokenizer:
    """``encode`` a batch of texts to id lists; ``vocab_size``; ``name`` (for meta.json)."""

    def __init__(self, spec: str) -> None:
        self.name = spec
        if spec == "bytes":
            self.vocab_size = 256
            self._encode: Callable[[List[str]], List[List[int]]] = lambda texts: [
                list(t.encode("utf-8")) for t in texts
            ]
            self._hf: Any = None
            return
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as e:
            raise UserError(
                "--tokenizer needs the tokenizers package: pip install 'torchx-diloco[data]', or pass 'bytes'"
            ) from e
        try:
            with fsspec.open(spec, "r", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError as e:
            raise UserError(f"--tokenizer {spec!r} does not exist; pass a tokenizer.json file or 'bytes'") from e
        except Exception as e:  # noqa: BLE001 - any fsspec failure becomes one line for the user
            raise UserError(f"--tokenizer {spec!r}: cannot read it ({e}); pass a tokenizer.json file or 'bytes'") from e
        try:
            self._hf = HFTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise UserError(
                f"--tokenizer {spec!r} is not a Hugging Face tokenizers file ({str(e).splitlines()[0]}); "
                "pass a tokenizer.json (tokenizer.save(...)) or 'bytes'"
            ) from e
        self.name = posixpath.basename(spec)
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        hf = self._hf
        self._encode = lambda texts: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]

    def encode(self, texts: List[str]) -> List[List[int]]:
        return self._encode(texts)

    def separator(self, eot: Optional[str]) -> List[int]:
        if eot is None:
            return self.encode(["\n\n"])[0]
        if self._hf is None:
            raise UserError("--eot names a token; --tokenizer bytes has none: leave --eot out")
        tid = self._hf.token_to_id(eot)
        if tid is None:
            raise UserError(f"--eot {eot!r} is not a token of {self.name}; pass one of its special tokens")
        return [tid]


def train_tokenizer(files: List[Any], vocab_size: int, field: str, kind: str) -> Any:
    """A byte-level BPE (GPT-2's kind: any text encodes, no unknown token) of ``vocab_size`` tokens, trained on
    the inputs' documents with the ``tokenizers`` library; ``EOT_TOKEN`` is its one special token."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ImportError as e:
        raise UserError("--tokenizer train: needs the tokenizers package: pip install 'torchx-diloco[data]'") from e
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text for f in files for text, _ in documents(f, field, kind)), trainer)
    return tok


# --- inputs ---------------------------------------------------------------------------------------------------
def _kind(path: str, kind: str = AUTO) -> str:
    """``kind`` as given, or (auto) the one of the path's suffix."""
    if kind != AUTO:
        return kind
    for suffix, known in KINDS.items():
        if path.lower().endswith(suffix):
            return known
    raise UserError(
        f"{path}: unknown kind of input (text is {', '.join(TEXT_SUFFIXES)}, or .jsonl, .parquet); "
        "for UTF-8 text of any other name (e.g. .py sources) pass --kind text"
    )


def resolve_inputs(inputs: Sequence[str], kind: str = AUTO) -> List[Any]:
    """fsspec OpenFiles, in order (each glob sorted), each checked for existence and kind."""
    found = []
    for spec in inputs:
        try:
            files = fsspec.open_files(spec, mode="rb")
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{spec}: cannot open ({e}); pass existing files, globs or fsspec URLs") from e
        if not files:
            raise UserError(f"{spec}: no file matches; pass existing files, globs or fsspec URLs")
        for f in sorted(files, key=lambda f: f.path):
            if not f.fs.exists(f.path):
                raise UserError(f"{spec}: {f.path} does not exist; pass existing files, globs or fsspec URLs")
            if f.fs.isdir(f.path):
                raise UserError(f"{spec}: {f.path} is a directory; pass its files or a glob like DIR/*.jsonl")
            _kind(f.path, kind)
            found.append(f)
    return found


def documents(f: Any, field: str, kind: str = AUTO) -> Iterator[tuple[str, bool]]:
    """(text, starts a document) pieces of one input: a document per record, or a text file as one document
    in pieces of about 1 MB cut at line ends (tokenized apart, joined with no separator)."""
    kind = _kind(f.path, kind)
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise UserError("reading .parquet needs pyarrow: pip install 'torchx-diloco[data]'") from e
        with f as fh:
            try:
                pf = pq.ParquetFile(fh)
            except Exception as e:  # noqa: BLE001 - pyarrow's errors vary
                raise UserError(f"{f.path} is not a readable parquet file ({e}); regenerate it") from e
            if field not in pf.schema_arrow.names:
                raise UserError(
                    f"{f.path} has no {field!r} column (it has {pf.schema_arrow.names}); pass --text-field NAME"
                )
            for batch in pf.iter_batches(columns=[field]):
                for value in batch.column(0).to_pylist():
                    if value:
                        yield str(value), True
        return
    with f as raw:
        import io

        fh = io.TextIOWrapper(raw, encoding="utf-8")
        try:
            if kind == "jsonl":
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        raise UserError(f"{f.path}:{n} is not JSON ({e}); fix the line or remove it") from e
                    if not isinstance(record, dict) or field not in record:
                        raise UserError(f"{f.path}:{n} has no {field!r} field; pass --text-field NAME")
                    if record[field]:
                        yield str(record[field]), True
                return
            first = True
            while True:
                chunk = fh.read(TEXT_CHUNK)
                if not chunk:
                    return
                chunk += fh.readline()  # to the end of the line
                yield chunk, first
                first = False
        except UnicodeDecodeError as e:
            raise UserError(
                f"{f.path} is not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x}); convert it to UTF-8 "
                "(e.g. iconv -t utf-8) or leave it out of the inputs"
            ) from e


# --- output ---------------------------------------------------------------------------------------------------
class ShardWriter:
    """Buffers tokens; every ``shard_tokens`` writes one llm.c-format shard through fsspec."""

    def __init__(self, out: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.out, self.shard_tokens, self.dtype = out.rstrip("/"), shard_tokens, dtype
        self.fs, self.root = fsspec.core.url_to_fs(self.out)
        self.buf = np.empty(shard_tokens, dtype=dtype)
        self.fill = 0
        self.shards: List[dict] = []

    def add(self, ids: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        while len(arr):
            take = min(len(arr), self.shard_tokens - self.fill)
            self.buf[self.fill : self.fill + take] = arr[:take]
            self.fill += take
            arr = arr[take:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"shard-{len(self.shards):05d}.bin"
        header = np.zeros(256, dtype=np.int32)
        header[:3] = [LLMC_MAGIC, 1 if self.dtype == np.uint16 else 2, self.fill]
        with self.fs.open(posixpath.join(self.root, name), "wb") as fh:
            fh.write(header.tobytes())
            fh.write(self.buf[: self.fill].tobytes())
        self.shards.append({"file": name, "tokens": int(self.fill)})
        self.fill = 0


def _emit(
    batch: List[tuple[str, bool]], tok: Tokenizer, sep: List[int], writer: ShardWriter, bar: Any, left: int
) -> int:
    """Tokenize a batch of pieces into the writer (a separator before each new document); the bytes counted."""
    for (_, starts), ids in zip(batch, tok.encode([t for t, _ in batch]), strict=True):
        if starts and (writer.shards or writer.fill):
            writer.add(sep)
        writer.add(ids)
    done = min(sum(len(t.encode("utf-8")) for t, _ in batch), left)
    bar.update(done)
    return done


def prepare(args: argparse.Namespace) -> dict:
    files = resolve_inputs(args.inputs, args.kind)
    spec, eot = args.tokenizer, args.eot
    if spec.startswith(TRAIN_PREFIX):  # trained here, saved beside the shards, used as a file would be
        trained = train_tokenizer(files, int(spec[len(TRAIN_PREFIX) :]), args.text_field, args.kind)
        spec, eot = posixpath.join(args.out.rstrip("/"), TRAINED_NAME), eot or EOT_TOKEN
        _check_new_out(args.out)
        with fsspec.open(spec, "w", encoding="utf-8") as fh:
            fh.write(trained.to_str())
    tok = Tokenizer(spec)
    sep = tok.separator(eot)
    dtype = np.dtype(np.uint16) if tok.vocab_size <= 65536 else np.dtype(np.uint32)
    fs, root = _check_new_out(args.out)
    writer = ShardWriter(args.out, args.shard_tokens, dtype)
    total_bytes = sum(int(f.fs.size(f.path) or 0) for f in files)
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=args.no_progress)
    docs = 0
    for f in files:
        pending: List[tuple[str, bool]] = []
        chars = counted = 0
        size = int(f.fs.size(f.path) or 0)
        for piece in documents(f, args.text_field, args.kind):
            pending.append(piece)
            chars += len(piece[0])
            docs += piece[1]
            if len(pending) >= BATCH_DOCS or chars >= BATCH_CHARS:
                counted += _emit(pending, tok, sep, writer, bar, size - counted)
                pending, chars = [], 0
        if pending:
            counted += _emit(pending, tok, sep, writer, bar, size - counted)
        bar.update(size - counted)  # the rest of the file (JSON syntax, parquet encoding)
    writer.flush()
    bar.close()
    if not writer.shards:
        raise UserError(f"the inputs hold no text ({len(files)} files); pass files with text in them")
    meta = {
        "format": META_FORMAT,
        "version": 1,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "dtype": str(dtype),
        "tokens": sum(s["tokens"] for s in writer.shards),
        "documents": docs,
        "shards": writer.shards,
        "inputs": [f.path for f in files],
    }
    with fs.open(posixpath.join(root, META_NAME), "w") as fh:
        json.dump(meta, fh, indent=1)
    return meta


def _check_new_out(out: str) -> tuple[Any, str]:
    """``--out``'s filesystem and path, created; refused in one line if it holds shards already or is not writable."""
    try:
        fs, root = fsspec.core.url_to_fs(out)
        if fs.exists(posixpath.join(root, META_NAME)):
            raise UserError(f"--out {out!r} already holds shards ({META_NAME}); pass a new --out directory")
        fs.makedirs(root, exist_ok=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--out {out!r}: cannot write there ({e}); pass a writable path or fsspec URL") from e
    return fs, root


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        meta = prepare(args)
    except UserError as e:
        print(f"torchx_diloco.prepare: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    print(
        f"wrote {meta['tokens']} tokens ({meta['documents']} documents) in {len(meta['shards'])} shards of "
        f"{meta['dtype']} (vocab {meta['vocab_size']}) and {META_NAME} to {args.out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
