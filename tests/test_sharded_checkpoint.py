"""Sharded DCP parts: round trip, manifest verification, and a malicious .metadata pickle refused."""

import hashlib
import json
import pickle

import pytest
import torch

from torchx_diloco.checkpoint import FORMAT_VERSION, CheckpointStore, CorruptCheckpoint
from torchx_diloco.checkpoint._io import HashingStream
from torchx_diloco.checkpoint.dcp import safe_load_metadata


def _write(store, step, value):
    state = {"w": torch.full((10,), float(value)), "opt": {"m": torch.ones(3), "lr": 0.5}}
    store.write_sharded_part(step, "global", state, {"outer_step": step, "manager": {"step": step}}, None)


def test_round_trip_checksums_written_as_hashed_and_damage_falls_back(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _write(store, 1, 1)
    _write(store, 2, 2)
    manifest = json.loads((tmp_path / "step_00000002" / "MANIFEST.global.json").read_text())
    assert manifest["format"] == FORMAT_VERSION and manifest["layout"] == "dcp" and ".metadata" in manifest["files"]
    for name, entry in manifest["files"].items():  # the checksums taken while writing are those of the files
        data = (tmp_path / "step_00000002" / "global" / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ckpt = store.latest(0)
    assert ckpt.step == 2 and ckpt.sharded == {"global"} and ckpt.global_state["outer_step"] == 2
    state = {"w": torch.zeros(10), "opt": {"m": torch.zeros(3), "lr": 0.0}}
    store.load_sharded_part(2, "global", state, None)
    assert torch.equal(state["w"], torch.full((10,), 2.0)) and state["opt"]["lr"] == 0.5
    victim = next(p for p in (tmp_path / "step_00000002" / "global").iterdir() if p.suffix == ".distcp")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, size unchanged: only the checksum sees it
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint):
        store.read_part(2, "global")
    assert store.latest(0).step == 1  # the damaged step is skipped for the one before


def test_hashing_stream_checksums_large_and_small_writes_in_order(tmp_path):
    chunks = [b"a" * 10, bytes(range(256)) * 8192, b"z", memoryview(torch.arange(1 << 19).numpy()).cast("B")]
    with open(tmp_path / "f", "wb") as f:
        stream = HashingStream(f)
        for chunk in chunks:
            stream.write(chunk)
    data = (tmp_path / "f").read_bytes()
    assert stream.bytes == len(data) and stream.hexdigest() == hashlib.sha256(data).hexdigest()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_metadata_refused():
    with pytest.raises(CorruptCheckpoint):
        safe_load_metadata(pickle.dumps(_Evil()))


def _run(args, world):
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = str(Path(__file__).with_name("sharded_worker.py"))
    if world == 1:
        cmd = [sys.executable, worker, *args]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", f"--nproc-per-node={world}", worker, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "save,load",
    [(("fsdp", 2), ("plain", 1)), (("plain", 1), ("fsdp", 2))],
    ids=["fsdp2ranks-to-plain1", "plain1-to-fsdp2ranks"],
)
def test_reshard_across_layouts(tmp_path, save, load):
    url = str(tmp_path / "ckpt")
    _run(["save", save[0], url], save[1])
    assert "LOADED OK" in _run(["load", load[0], url], load[1])


def test_sharded_part_on_s3_round_trips_and_verifies(s3_url):
    """On an object store each file is one PUT (hashed on the way); the manifest's checksums are the objects'."""
    store = CheckpointStore(s3_url)
    _write(store, 4, 3)
    ckpt = CheckpointStore(s3_url).latest(0)  # a fresh reader verifies every object against the manifest
    assert ckpt.step == 4 and ckpt.sharded == {"global"}
    state = {"w": torch.zeros(10), "opt": {"m": torch.zeros(3), "lr": 0.0}}
    store.load_sharded_part(4, "global", state, None)
    assert torch.equal(state["w"], torch.full((10,), 3.0)) and state["opt"]["lr"] == 0.5
