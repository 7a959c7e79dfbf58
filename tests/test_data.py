"""The data readers: text as bytes, token shards (.bin raw or with llm.c's header, .npy) memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from torchx_diloco.data import LLMC_MAGIC, META_NAME, Corpus, Shard, TokenStream, eval_batches, open_tokens, read_corpus
from torchx_diloco.errors import UserError

SEQ = 16


def tokens(n: int, vocab: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int64)


def write_llmc(path: Path, toks: np.ndarray, dtype=np.uint16) -> None:
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [LLMC_MAGIC, 1 if dtype == np.uint16 else 2, len(toks)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype(dtype).tobytes())


def stream_values(stream: TokenStream) -> np.ndarray:
    return stream.window(0, len(stream))


def test_raw_bin_uint16_is_memory_mapped(tmp_path):
    t = tokens(5000)
    t.astype(np.uint16).tofile(tmp_path / "train.bin")
    stream, vocab = open_tokens(str(tmp_path / "train.bin"))
    assert vocab is None
    assert isinstance(stream.parts[0], np.memmap) and stream.parts[0].dtype == np.uint16
    np.testing.assert_array_equal(stream_values(stream), t)


def test_raw_bin_uint32_takes_its_dtype_from_the_meta(tmp_path):
    t = tokens(3000, vocab=100_000)
    t.astype(np.uint32).tofile(tmp_path / "a.bin")
    (tmp_path / META_NAME).write_text(json.dumps({"dtype": "uint32", "vocab_size": 100_000}))
    stream, vocab = open_tokens(str(tmp_path / "a.bin"))
    assert vocab == 100_000 and stream.parts[0].dtype == np.uint32
    np.testing.assert_array_equal(stream_values(stream), t)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_llmc_header_is_detected(tmp_path, dtype):
    t = tokens(4000, vocab=60_000)
    write_llmc(tmp_path / "fineweb_train_000001.bin", t, dtype)
    stream, _ = open_tokens(str(tmp_path / "fineweb_train_000001.bin"))
    assert isinstance(stream.parts[0], np.memmap) and stream.parts[0].dtype == dtype and len(stream) == 4000
    np.testing.assert_array_equal(stream_values(stream), t)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.int64])
def test_npy_is_memory_mapped(tmp_path, dtype):
    t = tokens(2000)
    np.save(tmp_path / "t.npy", t.astype(dtype))
    stream, _ = open_tokens(str(tmp_path / "t.npy"))
    assert isinstance(stream.parts[0], np.memmap)
    np.testing.assert_array_equal(stream_values(stream), t)


def test_a_directory_and_a_glob_are_one_stream_in_name_order(tmp_path):
    t = tokens(9000)
    t[:3000].astype(np.uint16).tofile(tmp_path / "s0.bin")
    write_llmc(tmp_path / "s1.bin", t[3000:6000])
    np.save(tmp_path / "s2.npy", t[6000:].astype(np.uint16))
    (tmp_path / "notes.txt").write_text("not a shard")
    for url in (str(tmp_path), str(tmp_path) + "/", str(tmp_path / "s*")):
        stream, _ = open_tokens(url)
        assert len(stream.parts) == 3
        np.testing.assert_array_equal(stream_values(stream), t)
    # a window that crosses from one file into the next
    stream, _ = open_tokens(str(tmp_path))
    np.testing.assert_array_equal(stream.view(100, 8000).window(2890, 20), t[2990:3010])


def test_batches_are_windows_of_the_groups_disjoint_parts(tmp_path):
    t = np.arange(20_000) % 60_000
    t.astype(np.uint16).tofile(tmp_path / "a.bin")
    corpus = Corpus.load(str(tmp_path / "a.bin"), SEQ)
    assert len(corpus.train) + len(corpus.eval) == 20_000 and len(corpus.eval) == 1000
    seen = []
    for g in range(2):
        x, y = corpus.shard(g, 2, SEQ).batch(5, 8, SEQ, seed=3)
        assert x.dtype == torch.int64 and x.shape == (8, SEQ)
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))  # consecutive ids
        seen.append((x.min().item(), x.max().item()))
    assert seen[0][1] < 9500 <= seen[1][0], seen  # group 0 in [0, 9500), group 1 in [9500, 19000)


def test_a_batch_is_the_same_in_two_loads(tmp_path):
    """Resume exactness: batch i of group g is a pure function of (seed, g, i), whatever was read before."""
    t = tokens(30_000)
    t[:15_000].astype(np.uint16).tofile(tmp_path / "a.bin")
    t[15_000:].astype(np.uint16).tofile(tmp_path / "b.bin")
    first = Corpus.load(str(tmp_path), SEQ).shard(1, 3, SEQ)
    for i in range(20):
        first.batch(i, 4, SEQ, seed=7)
    second = Corpus.load(str(tmp_path), SEQ).shard(1, 3, SEQ)
    for i in (19, 3, 0):
        a, b = first.batch(i, 4, SEQ, seed=7), second.batch(i, 4, SEQ, seed=7)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(first.batch(0, 4, SEQ, seed=7)[0], first.batch(1, 4, SEQ, seed=7)[0])


def test_text_batches_are_what_they_were(tmp_path):
    """Text mode is unchanged: the windows of the bytes, the same generator (checked against the bytes)."""
    data = read_corpus("pydoc")
    corpus = Corpus.from_bytes(data, SEQ)
    assert corpus.vocab_size == 256
    shard = corpus.shard(0, 2, SEQ)
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 2)
    starts = torch.randint(0, len(shard.tokens) - SEQ - 1, (4,), generator=gen).tolist()
    x, _ = shard.batch(2, 4, SEQ, seed=5)
    assert [bytes(r.tolist()) for r in x] == [data[s : s + SEQ] for s in starts]
    assert Corpus.load("pydoc", SEQ).eval.window(0, 10).tolist() == list(data[-len(corpus.eval) :][:10])


def test_eval_data_is_held_out_and_train_is_all_of_data(tmp_path):
    t = tokens(8000)
    t.astype(np.uint16).tofile(tmp_path / "train.bin")
    (np.arange(500) % 7).astype(np.uint16).tofile(tmp_path / "val.bin")
    corpus = Corpus.load(str(tmp_path / "train.bin"), SEQ, eval_data=str(tmp_path / "val.bin"))
    assert len(corpus.train) == 8000 and len(corpus.eval) == 500
    x, y = next(eval_batches(corpus.eval, 4, SEQ))
    assert int(x.max()) < 7
    assert Corpus.load("pydoc", SEQ, eval_data=str(tmp_path / "val.bin")).vocab_size == 256


def test_vocab_size_from_the_meta_or_a_scan(tmp_path):
    t = tokens(5000, vocab=300)
    t[100] = 299
    t.astype(np.uint16).tofile(tmp_path / "a.bin")
    assert Corpus.load(str(tmp_path), SEQ).vocab_size == 300  # no meta: the largest id + 1
    (tmp_path / META_NAME).write_text(json.dumps({"vocab_size": 512, "shards": [{"file": "a.bin", "tokens": 5000}]}))
    assert Corpus.load(str(tmp_path), SEQ).vocab_size == 512


def rss_anon() -> int:
    """This process's anonymous resident memory (heap, not the file pages a memory map brings in), bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def test_memory_stays_flat_on_a_large_shard(tmp_path):
    """A 400 MB shard: loading it and drawing batches maps it; the process's own memory grows by far less than
    the file (the file pages it touches are the page cache's, reclaimable)."""
    path = tmp_path / "big.bin"
    n = 200_000_000
    with open(path, "wb") as f:
        f.truncate(n * 2)  # sparse: zeros, no disk written
    before = rss_anon()
    corpus = Corpus.load(str(path), 256)
    assert isinstance(corpus.train.parts[0], np.memmap)
    shard = corpus.shard(1, 2, 256)
    for i in range(20):
        shard.batch(i, 16, 256, seed=0)
    grew = rss_anon() - before
    assert grew < 20 * 2**20, f"memory grew by {grew / 2**20:.0f} MiB for a {n * 2 / 2**20:.0f} MiB shard"


def test_shard_accepts_a_tensor():
    shard = Shard(torch.arange(100) % 50)
    x, y = shard.batch(0, 2, 8, seed=0)
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "missing.bin does not exist"),
        ("empty_dir", "is an empty directory"),
        ("npy_float", "a token shard is 1-D uint16, uint32, int32 or int64"),
        ("npy_2d", "holds a 2-D"),
        ("odd_bytes", "not a whole number of uint16 tokens"),
        ("truncated_header", "the file is truncated"),
        ("meta_count", "holds 999 tokens, the file 1000"),
        ("meta_unlisted", "is not among the shards"),
        ("meta_dtype", "names dtype 'float'"),
        ("short", "too few for --seq-len"),
        ("mixed", "is not a .bin or .npy token shard"),
    ],
)
def test_bad_shards_are_one_line(tmp_path, setup, message):
    url = str(tmp_path / "a.bin")
    t = tokens(1000).astype(np.uint16)
    if setup == "missing":
        url = str(tmp_path / "missing.bin")
    elif setup == "empty_dir":
        (tmp_path / "d").mkdir()
        url = str(tmp_path / "d")
    elif setup in ("npy_float", "npy_2d"):
        arr = t.astype(np.float32) if setup == "npy_float" else t.reshape(10, 100)
        np.save(tmp_path / "a.npy", arr)
        url = str(tmp_path / "a.npy")
    elif setup == "odd_bytes":
        (tmp_path / "a.bin").write_bytes(t.tobytes() + b"x")
    elif setup == "truncated_header":
        write_llmc(tmp_path / "a.bin", t)
        (tmp_path / "a.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:-10])
    elif setup.startswith("meta"):
        t.tofile(tmp_path / "a.bin")
        meta = {
            "meta_count": {"shards": [{"file": "a.bin", "tokens": 999}]},
            "meta_unlisted": {"shards": [{"file": "b.bin", "tokens": 1000}]},
            "meta_dtype": {"dtype": "float"},
        }[setup]
        (tmp_path / META_NAME).write_text(json.dumps(meta))
    elif setup == "short":
        t[:20].tofile(tmp_path / "a.bin")
    elif setup == "mixed":
        t.tofile(tmp_path / "a.bin")
        (tmp_path / "b.txt").write_text("x")
        url = str(tmp_path / "*")
    with pytest.raises(UserError) as e:
        Corpus.load(url, SEQ)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_any_fsspec_url_is_read_through_the_local_cache():
    import fsspec

    fs = fsspec.filesystem("memory")
    t = tokens(5000, vocab=100)
    fs.pipe_file("/cached/a.bin", t.astype(np.uint16).tobytes())
    for url in ("memory://cached", "simplecache::memory://cached/a.bin", "filecache::memory://cached/*.bin"):
        stream, _ = open_tokens(url)
        assert isinstance(stream.parts[0], np.memmap), url
        np.testing.assert_array_equal(stream_values(stream), t)
    with pytest.raises(UserError, match="read it through the local cache: simplecache::memory://cached"):
        open_tokens("blockcache::memory://cached")  # not a local file: cannot be memory-mapped
    fs.rm("/cached", recursive=True)
