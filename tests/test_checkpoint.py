"""Durable backups on a local path, memory:// and s3:// (a real S3-protocol server on loopback)."""

from __future__ import annotations

import io
import json
import logging
import pickle
import time

import pytest
import torch

from torchx_diloco._fleet.faulty import FAULTS_ENV
from torchx_diloco.checkpoint import (
    FORMAT_VERSION,
    GLOBAL_PART,
    AsyncWriter,
    CheckpointStore,
    CorruptCheckpoint,
    group_part,
)
from torchx_diloco.errors import UserError


def global_state(step: int) -> dict:
    return {"outer_step": step, "diloco": {"global_weights": {"w": torch.full((3,), float(step))}}}


def write_step(store: CheckpointStore, step: int, groups=(0,)) -> None:
    for g in groups:
        store.write_part(step, group_part(g), {"data_position": step * 10 + g})
    store.write_part(step, GLOBAL_PART, global_state(step))


@pytest.fixture(params=["local", "memory", "s3"])
def url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpt")
    if request.param == "memory":
        return f"memory://{tmp_path.name}/ckpt"
    return request.getfixturevalue("s3_url")


def test_round_trip_latest_and_retention(url):
    store = CheckpointStore(url, keep=2)
    store.check_writable()
    for step in (1, 2, 3):
        write_step(store, step, groups=(0, 1))
        store.prune()
    assert store.steps() == [2, 3]
    ckpt = CheckpointStore(url).latest(group_id=1)  # a fresh reader, as a restarted process is
    assert ckpt.step == 3
    assert torch.equal(ckpt.global_state["diloco"]["global_weights"]["w"], torch.full((3,), 3.0))
    assert ckpt.group_state == {"data_position": 31}
    assert CheckpointStore(url).latest(group_id=5).group_state is None  # a group that wrote nothing there


def test_prune_keeps_the_newest_complete_steps_not_the_newest_folders(url):
    """Folders holding only groups' parts (their global part never came) do not count towards ``keep``: two
    complete steps stay loadable, and the folders newer than them (steps still being written) stay too."""
    store = CheckpointStore(url, keep=2)
    for step in (1, 2, 3):
        write_step(store, step)
    for step in (4, 5):  # a group's part only: no global manifest yet
        store.write_part(step, group_part(0), {"data_position": step})
    store.prune()
    assert store.steps() == [2, 3, 4, 5]
    assert [store.has_part(s, GLOBAL_PART) for s in store.steps()] == [True, True, False, False]
    assert store.latest(0).step == 3


def _damage(store: CheckpointStore, step: int, how: str) -> None:
    path = f"{store.step_dir(step)}/global.pt"
    if how == "no manifest":
        store.fs.rm_file(f"{store.step_dir(step)}/MANIFEST.global.json")
    elif how == "truncated":
        store.fs.pipe_file(path, store.fs.cat_file(path)[:-100])
    elif how == "flipped byte":
        data = bytearray(store.fs.cat_file(path))
        data[len(data) // 2] ^= 0xFF
        store.fs.pipe_file(path, bytes(data))
    elif how == "malformed manifest":
        store.fs.pipe_file(f"{store.step_dir(step)}/MANIFEST.global.json", b"{not json")


@pytest.mark.parametrize("how", ["no manifest", "truncated", "flipped byte", "malformed manifest"])
def test_damaged_newest_checkpoint_falls_back_to_previous(url, how, caplog):
    store = CheckpointStore(url, keep=5)
    write_step(store, 1)
    write_step(store, 2)
    _damage(store, 2, how)
    with caplog.at_level(logging.WARNING, logger="torchx_diloco.checkpoint"):
        ckpt = CheckpointStore(url).latest(group_id=0)
    assert ckpt.step == 1
    assert "step_00000002" in caplog.text  # reported, not silently skipped


class _Payload:
    """Unpickling this would run code: it must never happen."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_payload_is_refused_without_running_it(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    write_step(store, 1)
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    buf = io.BytesIO()
    torch.save({"diloco": _Payload()}, buf, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    # a forged step 2 with a manifest that matches the malicious file (checksums don't stop an attacker)
    import hashlib

    folder = store.step_dir(2)
    store.fs.makedirs(folder, exist_ok=True)
    store.fs.pipe_file(f"{folder}/global.pt", buf.getvalue())
    store.fs.pipe_file(
        f"{folder}/MANIFEST.global.json",
        json.dumps(
            {"file": "global.pt", "bytes": len(buf.getvalue()), "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
        ).encode(),
    )
    with pytest.raises(CorruptCheckpoint, match="refused by the safe loader"):
        store.read_part(2, GLOBAL_PART)
    assert store.latest(0).step == 1
    assert not marker.exists()


def test_rewriting_a_step_unpublishes_the_old_part_first(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    write_step(store, 1)
    store.write_part(1, GLOBAL_PART, global_state(7))
    assert store.read_part(1, GLOBAL_PART)["outer_step"] == 7


@pytest.mark.parametrize(
    "url, message",
    [
        ("/proc/version/ckpt", "is not writable"),
        ("nosuchprotocol://bucket/x", "is not a usable fsspec URL"),
    ],
)
def test_unusable_checkpoint_urls_get_one_line(url, message):
    with pytest.raises(UserError, match=message) as e:
        CheckpointStore(url).check_writable()
    assert "\n" not in str(e.value)


def test_storage_fault_is_logged_once_training_goes_on_and_next_write_succeeds(faulty_url, monkeypatch, caplog):
    """A disk that fails mid-write (the faulty:// filesystem) leaves the previous step loadable."""
    url = faulty_url
    store = CheckpointStore(url)
    write_step(store, 1)
    # the real fault injector reads its rules from the environment, as in a training process
    monkeypatch.setenv(FAULTS_ENV, json.dumps([{"match": "step_00000002/", "action": "full"}]))
    writer = AsyncWriter()
    with caplog.at_level(logging.ERROR, logger="torchx_diloco.checkpoint"):
        writer.submit(lambda: write_step(store, 2), "checkpoint of outer step 2")
        writer.wait()
    assert writer.failures == 1
    assert caplog.text.count("No space left on device") == 1
    assert store.latest(0).step == 1
    monkeypatch.setenv(FAULTS_ENV, "[]")
    writer.submit(lambda: write_step(store, 3), "checkpoint of outer step 3")
    writer.close()
    assert writer.failures == 1
    assert store.latest(0).step == 3


def test_wait_for_group_parts(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    store.write_part(4, group_part(0), {})
    assert not store.wait_for_group_parts(4, 2, timeout_s=0.2)
    store.write_part(4, group_part(1), {})
    assert store.wait_for_group_parts(4, 2, timeout_s=0.2)


def test_memory_store_publishes_without_waiting_for_other_groups(tmp_path):
    """memory:// lives in one process: other groups' parts can never appear there, so waiting would only stall."""
    store = CheckpointStore(f"memory://{tmp_path.name}/ckpt")
    store.write_part(1, group_part(0), {})
    start = time.monotonic()
    assert store.wait_for_group_parts(1, 2, timeout_s=120)
    assert time.monotonic() - start < 60  # it did not wait out its timeout (a second would be a speed)


def test_parts_are_stamped_with_the_format_version(tmp_path):
    """A one-file part keeps format 1 (what readers of format 1 read); a sharded part is format 3 (each rank's RNG
    under its own key: a reader of format 2 would look for one ``rng`` and fail, so it refuses the part in one
    line instead)."""
    store = CheckpointStore(str(tmp_path / "ckpt"))
    write_step(store, 1)
    for part in (GLOBAL_PART, group_part(0)):
        assert json.loads(store.fs.cat_file(f"{store.step_dir(1)}/MANIFEST.{part}.json"))["format"] == 1
    store.write_sharded_part(2, GLOBAL_PART, {"w": torch.ones(2)}, {"manager": {}}, None)
    manifest = json.loads(store.fs.cat_file(f"{store.step_dir(2)}/MANIFEST.{GLOBAL_PART}.json"))
    assert manifest["format"] == FORMAT_VERSION == 3


@pytest.mark.parametrize("where", ["global manifest", "group manifest", "global part"])
def test_checkpoint_of_a_newer_format_is_refused_in_one_line(tmp_path, where):
    """A newer torchx-diloco wrote it: not skipped as corrupt (an older step would win silently), not a KeyError."""
    url = str(tmp_path / "ckpt")
    store = CheckpointStore(url)
    write_step(store, 1)
    write_step(store, 2)
    newer = FORMAT_VERSION + 1
    folder = store.step_dir(2)
    if where == "global manifest":  # a layout we don't know: no "file" or "bytes" fields
        store.fs.pipe_file(
            f"{folder}/MANIFEST.global.json",
            json.dumps({"format": newer, "step": 2, "shards": ["global-0.pt"]}).encode(),
        )
    elif where == "group manifest":
        manifest = f"{folder}/MANIFEST.{group_part(0)}.json"
        store.fs.pipe_file(manifest, json.dumps({**json.loads(store.fs.cat_file(manifest)), "format": newer}).encode())
    else:
        store.write_part(2, GLOBAL_PART, {**global_state(2), "format": newer})
    with pytest.raises(UserError) as e:
        CheckpointStore(url).latest(group_id=0)
    message = str(e.value)
    assert f"step_00000002 was written by format {newer}; this torchx-diloco reads format {FORMAT_VERSION}" in message
    assert message.endswith("upgrade torchx-diloco or use another --checkpoint-dir")
    assert "\n" not in message
