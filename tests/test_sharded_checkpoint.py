"""Sharded DCP parts: round trip, manifest verification, and a malicious .metadata pickle refused."""

import pickle

import pytest
import torch

from torchx_diloco.checkpoint import CorruptCheckpoint
from torchx_diloco.sharded import load_sharded, safe_load_metadata, save_sharded


def test_round_trip_and_damage(tmp_path):
    url = str(tmp_path / "part")
    save_sharded(url, {"w": torch.arange(10.0), "opt": {"m": torch.ones(3)}, "step": 7})
    state = {"w": torch.zeros(10), "opt": {"m": torch.zeros(3)}, "step": 0}
    load_sharded(url, state)
    assert torch.equal(state["w"], torch.arange(10.0)) and state["step"] == 7
    victim = next(p for p in (tmp_path / "part").iterdir() if p.suffix == ".distcp")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, size unchanged: only the checksum sees it
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint):
        load_sharded(url, state)


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


@pytest.mark.parametrize(
    "save,load",
    [(("fsdp", 2), ("plain", 1)), (("plain", 1), ("fsdp", 2))],
    ids=["fsdp2ranks-to-plain1", "plain1-to-fsdp2ranks"],
)
def test_reshard_across_layouts(tmp_path, save, load):
    url = str(tmp_path / "part")
    _run(["save", save[0], url], save[1])
    assert "LOADED OK" in _run(["load", load[0], url], load[1])
