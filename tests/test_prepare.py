"""python -m torchx_diloco.prepare: text, .jsonl and .parquet into token shards the trainer reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from torchx_diloco import data, prepare
from torchx_diloco._fleet.testing import Lighthouse, committed, read_metrics, run_groups
from torchx_diloco.data import Corpus, open_tokens


def pydoc_texts(n: int = 40) -> list:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:n]]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> str:
    """A BPE tokenizer of 512 tokens trained here on pydoc text (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(pydoc_texts(200), trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def write_inputs(tmp: Path) -> dict:
    texts = pydoc_texts()
    (tmp / "a.txt").write_text(texts[0])
    (tmp / "b.md").write_text(texts[1])
    with open(tmp / "docs.jsonl", "w") as f:
        for t in texts[2:20]:
            f.write(json.dumps({"id": 1, "text": t}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts[20:], "n": list(range(len(texts) - 20))}), tmp / "docs.parquet")
    return {"texts": texts}


def run(argv) -> int:
    return prepare.main([*map(str, argv), "--no-progress"])


def test_the_names_match_the_reader():
    assert (prepare.META_NAME, prepare.META_FORMAT, prepare.LLMC_MAGIC) == (
        data.META_NAME,
        data.META_FORMAT,
        data.LLMC_MAGIC,
    )


def test_text_jsonl_parquet_with_a_bpe_tokenizer(tmp_path, bpe):
    from tokenizers import Tokenizer

    write_inputs(tmp_path)
    out = tmp_path / "shards"
    inputs = [tmp_path / "a.txt", tmp_path / "b.md", tmp_path / "docs.jsonl", tmp_path / "docs.parquet"]
    assert run([*inputs, "--out", out, "--tokenizer", bpe, "--shard-tokens", "20000", "--eot", "<|endoftext|>"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16" and meta["documents"] == 40
    assert meta["tokenizer"] == "tokenizer.json" and len(meta["shards"]) > 1
    assert all(s["tokens"] <= 20000 for s in meta["shards"])
    corpus = Corpus.load(str(out), 64)
    assert corpus.vocab_size == 512
    stream, _ = open_tokens(str(out))
    assert len(stream) == meta["tokens"]
    ids = stream.window(0, len(stream))
    tok = Tokenizer.from_file(bpe)
    eot = tok.token_to_id("<|endoftext|>")
    docs = np.split(ids, np.where(ids == eot)[0])
    decoded = [tok.decode(d[d != eot].tolist()) for d in docs]
    assert decoded == pydoc_texts()  # every document, in order, round-trips


def test_bytes_tokenizer_is_the_text_bytes(tmp_path):
    texts = pydoc_texts(3)
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    out = tmp_path / "shards"
    assert run([tmp_path / "*.txt", "--out", out, "--tokenizer", "bytes", "--shard-tokens", "5000"]) == 0
    stream, vocab = open_tokens(str(out))
    assert vocab == 256
    assert bytes(stream.window(0, len(stream)).astype(np.uint8)) == "\n\n".join(texts).encode()


def test_prepare_writes_to_s3_and_the_trainer_reads_through_the_cache(tmp_path, s3_url):
    (tmp_path / "a.txt").write_text("\n".join(pydoc_texts(10)))
    assert run([tmp_path / "a.txt", "--out", f"{s3_url}/shards", "--tokenizer", "bytes", "--shard-tokens", "9000"]) == 0
    corpus = Corpus.load(f"simplecache::{s3_url}/shards", 32)
    assert corpus.vocab_size == 256 and isinstance(corpus.train.parts[0], np.memmap)
    plain = Corpus.load(f"{s3_url}/shards", 32)  # a plain s3:// URL goes through the cache too
    a, b = corpus.shard(1, 2, 32).batch(4, 8, 32, 0), plain.shard(1, 2, 32).batch(4, 8, 32, 0)
    assert (a[0] == b[0]).all()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "missing.txt does not exist; pass existing files"),
        ("unknown", "a.csv: unknown kind of input (text is .txt, .text, .md, or .jsonl, .parquet); for UTF-8 text of"),
        (
            "py_without_kind",
            "train.py: unknown kind of input (text is .txt, .text, .md, or .jsonl, .parquet); for UTF-8",
        ),
        ("not_utf8", "a.txt is not UTF-8 text (invalid continuation byte: byte 0xe9); convert it to UTF-8"),
        ("kind_not_utf8", "model.bin is not UTF-8 text (invalid start byte: byte 0x80); convert it to UTF-8"),
        ("tokenizer_missing", "does not exist; pass a tokenizer.json file or 'bytes'"),
        ("tokenizer_bad", "is not a Hugging Face tokenizers file"),
        ("jsonl_no_text", "docs.jsonl:2 has no 'text' field; pass --text-field NAME"),
        ("jsonl_bad", "docs.jsonl:1 is not JSON"),
        ("parquet_no_text", "has no 'text' column"),
        ("eot_unknown", "--eot '<eos>' is not a token"),
        ("out_exists", "already holds shards"),
        ("empty", "the inputs hold no text"),
        ("no_out", "the following arguments are required: --out"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, bpe, case, message):
    txt = tmp_path / "a.txt"
    txt.write_text("some text\n")
    argv: list = [txt, "--out", tmp_path / "out", "--tokenizer", "bytes"]
    if case == "missing":
        argv[0] = tmp_path / "missing.txt"
    elif case == "unknown":
        argv[0] = tmp_path / "a.csv"
        argv[0].write_text("x")
    elif case == "py_without_kind":
        argv[0] = tmp_path / "train.py"
        argv[0].write_text("print('hello')\n")
    elif case == "not_utf8":
        txt.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    elif case == "kind_not_utf8":
        argv[0] = tmp_path / "model.bin"
        argv[0].write_bytes(b"\x80\x04\x95 a pickle, not text")
        argv += ["--kind", "text"]
    elif case == "tokenizer_missing":
        argv[-1] = tmp_path / "nope.json"
    elif case == "tokenizer_bad":
        argv[-1] = txt
    elif case == "jsonl_no_text":
        argv[0] = tmp_path / "docs.jsonl"
        argv[0].write_text('{"text": "x"}\n{"body": "y"}\n')
    elif case == "jsonl_bad":
        argv[0] = tmp_path / "docs.jsonl"
        argv[0].write_text("text: x\n")
    elif case == "parquet_no_text":
        import pyarrow as pa
        import pyarrow.parquet as pq

        argv[0] = tmp_path / "d.parquet"
        pq.write_table(pa.table({"body": ["x"]}), argv[0])
    elif case == "eot_unknown":
        argv[-1] = bpe
        argv += ["--eot", "<eos>"]
    elif case == "out_exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "meta.json").write_text("{}")
    elif case == "empty":
        txt.write_text("")
    elif case == "no_out":
        argv = [txt, "--tokenizer", "bytes"]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchx_diloco.prepare: error: ") and "\n" not in err, err
    assert message in err, err


@pytest.mark.slow
def test_two_groups_train_on_prepared_shards_from_s3(tmp_path, s3_url):
    """prepare (bytes: the nano GPT's vocab is 256) to S3, then a real two-group run reading them through the
    local cache, with --eval-data a separate shard set."""
    texts = pydoc_texts(90)
    (tmp_path / "train.txt").write_text("\n".join(texts[:75]))
    (tmp_path / "val.txt").write_text("\n".join(texts[75:]))
    for split in ("train", "val"):
        argv = [tmp_path / f"{split}.txt", "--out", f"{s3_url}/{split}", "--tokenizer", "bytes"]
        assert run([*argv, "--shard-tokens", "50000"]) == 0
    ckpt = tmp_path / "ckpt"
    args = [
        "--model", "nano", "--outer-steps", "2", "--sync-every", "5", "--batch-size", "4", "--seq-len", "32",
        "--data", f"simplecache::{s3_url}/train", "--eval-data", f"{s3_url}/val", "--eval-batches", "1",
        "--checkpoint-dir", str(ckpt), "--device", "cpu",
    ]  # fmt: skip
    lh = Lighthouse(tmp_path, min_replicas=2)
    try:
        run_groups(2, lh.url, args, tmp_path, timeout=180)
    finally:
        lh.kill()
    for g in range(2):
        records = committed(read_metrics(ckpt / "metrics" / f"replica_group_{g}.jsonl"))
        assert [r["outer_step"] for r in records][-1] == 2, records
        assert all(np.isfinite(r["loss"]) for r in records)


def test_kind_text_reads_any_utf8_file_whatever_its_name(tmp_path):
    """--kind text: Python sources (the standard library's own) and a file with no suffix, each one document."""
    from json import decoder

    sources = [Path(json.__file__), Path(decoder.__file__)]
    notes = tmp_path / "NOTES"
    notes.write_text("caf\u00e9 \u2713, na\u00efve\n", encoding="utf-8")
    out = tmp_path / "shards"
    assert run([*sources, notes, "--out", out, "--tokenizer", "bytes", "--kind", "text"]) == 0
    stream, vocab = open_tokens(str(out))
    want = "\n\n".join(p.read_text(encoding="utf-8") for p in [*sources, notes]).encode()
    assert vocab == 256 and bytes(stream.window(0, len(stream)).astype(np.uint8)) == want
    assert json.loads((out / "meta.json").read_text())["documents"] == 3


def test_a_large_text_file_is_one_document_in_pieces(tmp_path, monkeypatch):
    """Text files are tokenized in pieces cut at line ends (memory stays bounded), with no separator between."""
    monkeypatch.setattr(prepare, "TEXT_CHUNK", 1000)
    text = "\n".join(pydoc_texts(5))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text("the second file")
    out = tmp_path / "shards"
    assert run([tmp_path / "a.txt", tmp_path / "b.txt", "--out", out, "--tokenizer", "bytes"]) == 0
    stream, _ = open_tokens(str(out))
    assert bytes(stream.window(0, len(stream)).astype(np.uint8)) == (text + "\n\nthe second file").encode()
    assert json.loads((out / "meta.json").read_text())["documents"] == 2


def test_a_tokenizer_trained_on_the_inputs_is_saved_beside_the_shards_and_used(tmp_path):
    """--tokenizer train:VOCAB: a byte-level BPE of that many tokens learnt from the inputs, saved as
    OUT/tokenizer.json; the shards are its ids, documents joined by its <|endoftext|>, and it reads back."""
    from tokenizers import Tokenizer as HFTokenizer

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"m{i}.py").write_text("def add(a, b):\n    return a + b\n" * 200 + f"# file {i}\n")
    out = tmp_path / "shards"
    assert prepare.main([f"{src}/*.py", "--kind", "text", "--tokenizer", "train:300", "--out", str(out)]) == 0
    tok = HFTokenizer.from_file(str(out / "tokenizer.json"))
    assert 256 < tok.get_vocab_size() <= 300  # (as many merges as the text has, up to the size asked for)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "tokenizer.json" and meta["documents"] == 3
    assert meta["vocab_size"] == tok.get_vocab_size()
    tokens, vocab = open_tokens(str(out), "--data")
    ids = np.asarray(tokens.window(0, len(tokens)))
    eot = tok.token_to_id("<|endoftext|>")
    assert int((ids == eot).sum()) == 2  # between the three documents
    assert tok.decode(list(ids[: int(np.argmax(ids == eot))])).startswith("def add(a, b):")
    assert len(ids) < sum(len(f.read_bytes()) for f in src.glob("*.py")) / 2  # merges learnt: far fewer tokens


def test_a_trained_tokenizer_needs_room_for_the_bytes(capsys, tmp_path):
    assert prepare.main(["x.py", "--kind", "text", "--tokenizer", "train:100", "--out", str(tmp_path)]) == 2
    assert "train:VOCAB needs a whole number of at least 260" in capsys.readouterr().err
