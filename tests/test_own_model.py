"""Bring your own model: a transformers causal LM and factories that seed by group, as real replica groups."""

from __future__ import annotations

import json

import pytest
import torch

from torchx_diloco._fleet.testing import (
    REPO,
    Group,
    Lighthouse,
    committed,
    committed_checksums,
    metrics_url,
    read_metrics,
)

pytestmark = pytest.mark.slow

COMMON = ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--group-wait", "20", "--min-replicas", "2"]
# the factories in tests/model_factories.py are imported by name: the groups run in tmp_path
ENV = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def run(tmp_path, args, tag=""):
    lighthouse = Lighthouse(tmp_path, min_replicas=2)
    groups = [Group(g, 2, lighthouse.url, [*COMMON, *args], tmp_path, extra_env=ENV, tag=tag) for g in range(2)]
    try:
        for g in groups:
            assert g.wait(180) == 0, g.output()[-3000:]
    finally:
        for g in groups:
            g.kill()
        lighthouse.kill()
    return groups


def test_hf_causal_lm_two_groups_loss_falls_weights_agree_and_resume(tmp_path):
    ckpt = tmp_path / "ckpt"
    hf = ["--model", "torchx_diloco.hf:causal_lm", "--model-args", json.dumps({"arch": "gpt2", "n_layer": 2})]
    args = [*hf, "--sync-every", "5", "--inner-lr", "3e-3", "--checkpoint-dir", str(ckpt)]
    run(tmp_path, [*args, "--outer-steps", "3"])
    sums = [committed_checksums(ckpt, g) for g in range(2)]
    assert list(sums[0]) == [1, 2, 3] and sums[0] == sums[1], sums
    losses = [r["loss"] for r in committed(read_metrics(metrics_url(ckpt, 0)))]
    assert losses[-1] < losses[0] - 0.3, losses

    resumed = run(tmp_path, [*args, "--outer-steps", "5"], tag="-resumed")
    for g in resumed:
        out = g.output()
        assert "resumed from" in out and "(outer step 3)" in out, out[-2000:]
        assert "[4] loss" in out and "[3] loss" not in out, "it continues from step 3"
    sums = [committed_checksums(ckpt, g) for g in range(2)]
    assert list(sums[0]) == [1, 2, 3, 4, 5] and sums[0] == sums[1], sums


def test_factory_seeded_by_group_still_starts_every_group_from_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    from tests import model_factories

    monkeypatch.setenv("REPLICA_GROUP_ID", "1")
    one = model_factories.seeded_by_group().state_dict()
    monkeypatch.setenv("REPLICA_GROUP_ID", "0")
    zero = model_factories.seeded_by_group().state_dict()
    assert not torch.equal(one["tok_emb.weight"], zero["tok_emb.weight"]), "the factory makes them differ"

    sums = {}
    for factory in ("seeded_by_group", "seeded_alike"):
        ckpt = tmp_path / factory
        run(
            tmp_path,
            ["--model", f"tests.model_factories:{factory}", "--outer-steps", "2", "--sync-every", "3"]
            + ["--checkpoint-dir", str(ckpt)],
            tag=f"-{factory}",
        )
        sums[factory] = [committed_checksums(ckpt, g) for g in range(2)]
        assert list(sums[factory][0]) == [1, 2] and sums[factory][0] == sums[factory][1], sums
    assert sums["seeded_by_group"] == sums["seeded_alike"], "the groups took group 0's initial weights"


@pytest.mark.timeout(300)
def test_torchx_run_trains_a_transformers_llama(tmp_path, monkeypatch):
    """`torchx run diloco.diloco -- --model torchx_diloco.hf:causal_lm --model-args ...` on local_cwd."""
    from tests.test_run_e2e import OUTER, lighthouse_port, read, role_log, start_nano_run, stop

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = ["--model", "torchx_diloco.hf:causal_lm", "--model-args", json.dumps({"arch": "llama", "hidden_size": 32})]
    proc = start_nano_run(
        tmp_path,
        None,
        outer=2,
        max_restarts=0,
        idle_exit=3,
        sync_every=5,
        train_flags=[*model, "--min-replicas", "2", "--group-wait", "60"],
    )
    try:
        rc = proc.wait(timeout=240)
    finally:
        stop(proc, lighthouse_port(tmp_path / "logs"))
    assert rc == 0, read(tmp_path / "torchx.log")[-4000:]
    for g in range(2):
        assert OUTER.findall(read(role_log(tmp_path / "logs", f"replica_group_{g}"))) == ["1", "2"]
    sums = [committed_checksums(tmp_path / "ckpt", g) for g in range(2)]
    assert list(sums[0]) == [1, 2] and sums[0] == sums[1], sums
