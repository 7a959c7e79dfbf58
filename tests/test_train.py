"""The trainer in one process against a real torchft lighthouse: what happens around a sync."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from torchx_diloco._fleet.testing import committed, metrics_url, read_metrics
from torchx_diloco.checkpoint import GLOBAL_PART, CheckpointStore
from torchx_diloco.config import parse_config
from torchx_diloco.data import eval_batches
from torchx_diloco.modeling import forward_loss
from torchx_diloco.train import Trainer


def _left_behind(lighthouse: str, tmp_path, peers_run: Optional[str]) -> Trainer:
    """Group 0 of 2, H=4, 7 outer steps; after it started, step 5 appears in its folder, written by ``peers_run``
    (None: by this very run, as its peers would)."""
    env = {"REPLICA_GROUP_ID": "0", "NUM_REPLICA_GROUPS": "2", "TORCHFT_LIGHTHOUSE": lighthouse}
    flags = ["--model", "nano", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "0", "--sync-every", "4"]
    flags += ["--outer-steps", "7", "--group-wait", "0", "--device", "cpu", "--checkpoint-dir", str(tmp_path / "ckpt")]
    trainer = Trainer(parse_config(flags, env))
    peers = {name: torch.full_like(p, 0.01) for name, p in trainer.model.named_parameters()}
    CheckpointStore(trainer.cfg.checkpoint.dir).write_part(
        5,
        GLOBAL_PART,
        {
            "model_config": trainer.model.cfg.to_dict(),
            "manager": {"step": 5, "batches_committed": 10},
            "diloco": {"global_weights": peers, "outer_optimizer": trainer.outer_opt.state_dict()},
        },
        run=peers_run or trainer.checkpointer.run,
    )
    return trainer


def test_a_gradient_computed_on_weights_replaced_by_a_newer_checkpoint_stays_out_of_adamw(lighthouse, tmp_path):
    """Group 0 is left behind: its peers published outer step 5 while it trained its first window. At that
    window's sync it adopts step 5; the H-th gradient, computed on the weights it just dropped, must not reach
    AdamW's moments (every other inner step's gradient does)."""
    trainer = _left_behind(lighthouse, tmp_path, peers_run=None)
    assert trainer.run() == 0

    assert trainer.manager.current_step() == 7  # adopted 5 at its first sync, which committed 6; then 7
    assert trainer.progress.inner_steps == 2 * trainer.cfg.diloco.sync_every
    adam_steps = {int(state["step"]) for state in trainer.inner_opt.state.values()}
    assert adam_steps == {trainer.progress.inner_steps - 1}, adam_steps


def test_a_step_another_run_wrote_is_never_taken_for_a_peers(lighthouse, tmp_path):
    """The same, but step 5 was written by another run (its manifest says so): the group trains on alone, all
    7 outer steps, and never adopts it."""
    trainer = _left_behind(lighthouse, tmp_path, peers_run="someone-else")
    assert trainer.run() == 0
    assert trainer.manager.current_step() == 7
    assert trainer.progress.inner_steps == 7 * trainer.cfg.diloco.sync_every
    steps = [r["outer_step"] for r in committed(read_metrics(metrics_url(tmp_path / "ckpt", 0)))]
    assert steps == list(range(1, 8)), steps


def _trainer(lighthouse: str, tmp_path, *args: str) -> Trainer:
    env = {"REPLICA_GROUP_ID": "0", "NUM_REPLICA_GROUPS": "1", "TORCHFT_LIGHTHOUSE": lighthouse}
    flags = ["--seq-len", "32", "--batch-size", "2", "--group-wait", "0", "--device", "cpu"]
    return Trainer(parse_config([*flags, "--checkpoint-dir", str(tmp_path / "ckpt"), *args], env))


def _our_threads() -> set:
    """The writer's and the sync's threads alive now (objects: a new executor reuses its names)."""
    return {t for t in threading.enumerate() if t.name.startswith(("checkpoint-writer", "diloco-sync"))}


def test_an_exception_mid_run_still_closes_the_writer_the_sync_thread_and_the_manager(lighthouse, tmp_path):
    """The model raises after a few committed outer steps (checkpoints written, a sync overlapped): run() raises
    it, and the writer's and the overlapped sync's threads are gone, the Manager shut down."""
    before = _our_threads()  # (an earlier test's outer loop left unclosed)
    trainer = _trainer(
        lighthouse,
        tmp_path,
        *("--model", "tests.model_factories:raises_mid_run", "--model-args", '{"after": 9}'),
        *("--sync-every", "4", "--overlap-steps", "1", "--outer-steps", "5", "--eval-batches", "0"),
    )
    with pytest.raises(RuntimeError, match="the model broke mid-run"):
        trainer.run()
    assert trainer.manager.current_step() == 2  # two outer steps committed before the error
    assert not _our_threads() - before, _our_threads() - before
    assert trainer.checkpointer.writer._pool._shutdown
    with pytest.raises(RuntimeError):  # a Manager that was shut down takes no more quorums
        trainer.manager.start_quorum()


def test_eval_loss_is_the_global_weights_loss_when_the_local_weights_differ(lighthouse, tmp_path):
    """With 2 fragments the model holds local weights after a commit (the other fragment trained on): the
    recorded eval loss is that of the global weights, computed here independently, not of the model as it is."""
    trainer = _trainer(
        lighthouse,
        tmp_path,
        *("--model", "nano", "--sync-every", "4", "--fragments", "2", "--outer-steps", "3", "--eval-batches", "2"),
    )
    assert trainer.run() == 0
    records = read_metrics(metrics_url(tmp_path / "ckpt", 0))
    recorded = committed(records)[-1]["eval_loss"]

    def eval_loss(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            batches = eval_batches(trainer.eval_tokens, 2, 32, 2)
            losses = [forward_loss(model, x, y).item() for x, y in batches]
        return sum(losses) / len(losses)

    on_global = copy.deepcopy(trainer.model)
    on_global.load_state_dict(trainer.diloco.state_dict()["global_weights"], strict=False)
    assert recorded == pytest.approx(eval_loss(on_global), rel=1e-6)
    assert eval_loss(copy.deepcopy(trainer.model)) != pytest.approx(recorded, rel=1e-6), "local == global here"


def test_a_run_whose_folder_is_taken_over_stops_in_one_line_before_its_next_sync(lighthouse, tmp_path):
    """Another run takes the folder over (--take-over) while this one trains: at its next renewal this run
    learns of it and stops before its next sync, with one line; the folder stays the other run's."""
    from torchx_diloco.errors import UserError
    from torchx_diloco.lease import Lease

    trainer = _trainer(
        lighthouse,
        tmp_path,
        *("--model", "nano", "--sync-every", "2", "--outer-steps", "100000", "--eval-batches", "0"),
        *("--checkpoint-lease-s", "0.4"),  # renewed every 0.1 s
    )
    failure: list = []
    worker = threading.Thread(target=lambda: failure.append(_raised(trainer.run)), daemon=True)
    worker.start()
    folder = tmp_path / "ckpt"
    deadline = time.monotonic() + 60
    while not committed(read_metrics(metrics_url(folder, 0))):  # training: outer steps committed
        assert time.monotonic() < deadline and worker.is_alive(), failure
        time.sleep(0.05)
    Lease(str(folder), "the-new-owner", ttl_s=60).acquire(take_over=True)
    worker.join(60)
    assert not worker.is_alive(), "the run went on in a folder another run took over"
    assert isinstance(failure[0], UserError) and "another run took --checkpoint-dir" in str(failure[0]), failure
    assert Lease(str(folder), "?", 60).holder().run == "the-new-owner"


def _raised(fn) -> Optional[BaseException]:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - handed to the test's thread
        return e
    return None


def test_a_run_refused_at_start_does_not_hold_the_folder(lighthouse, tmp_path):
    """Bad input found after the folder was checked (here: --data that does not exist) ends the run before it
    takes the folder's lease: the next run is not kept waiting."""
    from torchx_diloco.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        _trainer(lighthouse, tmp_path, "--model", "nano", "--data", str(tmp_path / "missing.txt"))
    assert (tmp_path / "ckpt").is_dir() and not (tmp_path / "ckpt" / "LEASE.json").exists()


FAULTS_PER_STEP = """
import ctypes, resource, sys
from tests.conftest import lighthouse_server
from torchx_diloco.config import parse_config
from torchx_diloco import train

# glibc at its most eager to give memory back (fixed thresholds of 128 KiB: whether its dynamic ones trim the
# gradients depends on where the first outer step's buffers land, which differs between machines), then, for
# "keep", what train.main() does first
mallopt = ctypes.CDLL("libc.so.6").mallopt
mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
mallopt(-1, 128 << 10)  # M_TRIM_THRESHOLD
if sys.argv[1] == "keep":
    train.keep_freed_memory()
with lighthouse_server() as lighthouse:
    env = {"REPLICA_GROUP_ID": "0", "NUM_REPLICA_GROUPS": "1", "TORCHFT_LIGHTHOUSE": lighthouse}
    args = ["--model", "small", "--seq-len", "32", "--batch-size", "2", "--sync-every", "3", "--outer-steps", "4",
            "--eval-batches", "0", "--group-wait", "0", "--device", "cpu", "--checkpoint-dir", sys.argv[2]]
    trainer = train.Trainer(parse_config(args, env))
    faults, step = [], trainer.inner_opt.step

    def counted(*a, **k):
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        return step(*a, **k)

    trainer.inner_opt.step = counted
    trainer.run()
per_step = sorted(b - a for a, b in zip(faults[4:], faults[5:]))  # after the first outer step
print("FAULTS", per_step[len(per_step) // 2])
"""


@pytest.mark.slow
def test_inner_steps_reuse_the_freed_gradients_instead_of_faulting_them_in(tmp_path):
    """glibc trimmed the gradients zero_grad frees back to the kernel after our first outer step, so every inner
    step of a 10.7M GPT page-faulted their ~40 MB in afresh (~10k faults; torchft's order never did). Whether its
    dynamic thresholds do so differs between machines, so both runs start from glibc's most trimming settings:
    the thresholds train.main() sets must override them (an inner step under a tenth of the faults), and without
    them the count must show the faults (so the measurement sees them where they happen)."""
    import subprocess
    import sys

    def median_faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_PER_STEP, mode, str(tmp_path / mode)],
            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split("FAULTS")[-1])

    kept, trimmed = median_faults("keep"), median_faults("trim")
    assert kept < 1000 < trimmed, (kept, trimmed)
