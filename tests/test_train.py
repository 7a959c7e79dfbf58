"""The trainer in one process against a real torchft lighthouse: what happens around a sync."""

from __future__ import annotations

import torch

from torchx_diloco.checkpoint import GLOBAL_PART, CheckpointStore
from torchx_diloco.config import parse_config
from torchx_diloco.train import Trainer


def test_a_gradient_computed_on_weights_replaced_by_a_newer_checkpoint_stays_out_of_adamw(lighthouse, tmp_path):
    """Group 0 is left behind: its peers published outer step 5 while it trained its first window. At that
    window's sync it adopts step 5; the H-th gradient, computed on the weights it just dropped, must not reach
    AdamW's moments (every other inner step's gradient does)."""
    env = {"REPLICA_GROUP_ID": "0", "NUM_REPLICA_GROUPS": "2", "TORCHFT_LIGHTHOUSE": lighthouse}
    cfg = parse_config(
        [
            "--model",
            "nano",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--eval-batches",
            "0",
            "--sync-every",
            "4",
            "--outer-steps",
            "7",
            "--group-wait",
            "0",
            "--device",
            "cpu",
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
        ],
        env,
    )
    trainer = Trainer(cfg)
    peers = {name: torch.full_like(p, 0.01) for name, p in trainer.model.named_parameters()}
    CheckpointStore(cfg.checkpoint.dir).write_part(
        5,
        GLOBAL_PART,
        {
            "model_config": trainer.model.cfg.to_dict(),
            "manager": {"step": 5, "batches_committed": 10},
            "diloco": {"global_weights": peers, "outer_optimizer": trainer.outer_opt.state_dict()},
        },
    )

    assert trainer.run() == 0

    assert trainer.manager.current_step() == 7  # adopted 5 at its first sync, which committed 6; then 7
    assert trainer.progress.inner_steps == 2 * cfg.diloco.sync_every
    adam_steps = {int(state["step"]) for state in trainer.inner_opt.state.values()}
    assert adam_steps == {trainer.progress.inner_steps - 1}, adam_steps
