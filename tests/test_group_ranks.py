"""Replica groups of several ranks (DDP over Gloo on CPU, under torchrun): each rank reads its own data, the
group's ranks take every decision together, and the groups still agree on the global weights."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
import torch

from tests.test_groups import SMALL
from torchx_diloco._fleet.faulty import FAULTS_ENV
from torchx_diloco._fleet.testing import (
    REPO,
    TORCHRUN,
    Group,
    Lighthouse,
    clean_env,
    committed,
    kill_pid,
    metrics_url,
    read_metrics,
)
from torchx_diloco.checkpoint import GLOBAL_PART, CheckpointStore
from torchx_diloco.data import Corpus, read_corpus
from torchx_diloco.lease import run_identity
from torchx_diloco.model import build_model
from torchx_diloco.train import build_optimizers

SEQ = 32
ARGS = [*SMALL, "--device", "cpu", "--sync-every", "4", "--min-replicas", "2"]


def test_ranks_of_a_group_read_disjoint_parts_of_its_shard():
    """Rank r of G reads the r-th part of its group's shard; a one-rank group reads the whole shard, as before."""
    corpus = Corpus.from_bytes(read_corpus("pydoc"), SEQ)
    for group in range(2):
        whole = corpus.shard(group, 2, SEQ)
        alone = corpus.shard(group, 2, SEQ, rank=0, ranks=1)
        assert (alone.tokens.start, len(alone.tokens)) == (whole.tokens.start, len(whole.tokens))
        parts = [corpus.shard(group, 2, SEQ, rank=r, ranks=2) for r in range(2)]
        spans = [(p.tokens.start, p.tokens.start + len(p.tokens)) for p in parts]
        assert spans[0][1] <= spans[1][0], f"the ranks' parts overlap: {spans}"
        assert whole.tokens.start <= spans[0][0] and spans[1][1] <= whole.tokens.start + len(whole.tokens)
        # the same seed and index in both ranks (the trainer's data seed is the group's): different windows
        (x0, _), (x1, _) = (p.batch(3, 4, SEQ, seed=7919 + group) for p in parts)
        assert not torch.equal(x0, x1)


def test_rank0_decides_for_the_group(tmp_path):
    """Two Gloo ranks that saw different things leave with rank 0's decision, and with the mean of their values
    (a group's recorded loss), and exit 0: they leave their process group as the trainer does (without, 3 to 8 in
    20 such exits aborted here in Gloo's teardown); one rank needs no collective."""
    script = tmp_path / "decide.py"
    script.write_text(
        "import os, torch, torch.distributed as dist\n"
        "from torchx_diloco.cluster import group_mean, leave_group_process_group, rank0_decides\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "print(f'rank {rank} decided {rank0_decides(10 + rank)}', flush=True)\n"
        "print(f'rank {rank} mean {group_mean(torch.tensor(float(rank + 1)))}', flush=True)\n"
        "leave_group_process_group()\n"
        "assert not dist.is_initialized()\n"
    )
    out = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script)],
        env=clean_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rank 0 decided 10" in out.stdout and "rank 1 decided 10" in out.stdout, out.stdout
    assert "rank 0 mean 1.5" in out.stdout and "rank 1 mean 1.5" in out.stdout, out.stdout
    # a one-rank group: the value back, without a process group to broadcast over
    from torchx_diloco.cluster import group_mean, rank0_decides

    assert rank0_decides(5) == 5 and group_mean(torch.tensor(2.5)) == 2.5


def checksums(records: Dict[int, List[dict]]) -> Dict[int, Dict[int, str]]:
    """Outer step -> global weights checksum, per group."""
    return {g: {r["outer_step"]: r["weights_sha"] for r in rs} for g, rs in records.items()}


def fleet_records(
    tmp_path: Path, nproc: int, outer_steps: int = 3, extra: Sequence[str] = (), ckpt_tag: str = ""
) -> Dict[int, List[dict]]:
    """2 groups of ``nproc`` ranks to the end; each group's committed metrics records (``ckpt_tag``: the
    checkpoint folder of an earlier fleet, to resume from)."""
    lighthouse = Lighthouse(tmp_path, min_replicas=2)
    tag = f"-x{nproc}{''.join(extra).replace('-', '')}"
    ckpt = tmp_path / f"ckpt{ckpt_tag or tag}"
    args = [*ARGS, "--outer-steps", str(outer_steps), "--checkpoint-dir", str(ckpt), *extra]
    earlier = {g: len(read_metrics(metrics_url(ckpt, g))) if ckpt_tag else 0 for g in range(2)}
    groups = [Group(g, 2, lighthouse.url, args, tmp_path, tag=tag, nproc=nproc) for g in range(2)]
    for g in groups:
        assert g.wait(120) == 0, g.output()[-3000:]
    lighthouse.kill()
    if ckpt_tag:  # a resumed fleet: its groups read the earlier fleet's newest step
        for g in range(2):
            log = (tmp_path / f"group{g}{tag}.log").read_text()
            assert f"group {g} resumed from" in log, log[-3000:]
    records = {g: committed(read_metrics(metrics_url(ckpt, g))[earlier[g] :]) for g in range(2)}
    for rs in records.values():
        # the group's distinct tokens: every rank drew its own batches
        assert all(r["tokens"] == r["inner_steps"] * 4 * SEQ * nproc for r in rs), rs
    return records


@pytest.mark.slow
def test_two_groups_of_two_ranks_agree_and_their_ranks_train_on_different_batches(tmp_path):
    """2 groups x 2 Gloo ranks through torchrun: the groups hold identical global weights at every outer step,
    and the second rank of each group adds data of its own. Were its batches its rank 0's (as they once were),
    DDP would average two equal gradients, and the run would end bit for bit where 2 groups of 1 rank end."""
    two_records, one_records = fleet_records(tmp_path, nproc=2), fleet_records(tmp_path, nproc=1)
    two, one = (
        {g: {r["outer_step"]: r["weights_sha"] for r in rs} for g, rs in recs.items()}
        for recs in (two_records, one_records)
    )
    assert list(two[0]) == [1, 2, 3] and two[0] == two[1], two
    assert len(set(two[0].values())) == 3, "the weights must change at every outer step"
    assert one[0] == one[1], one
    assert all(two[0][k] != one[0][k] for k in one[0]), "the second ranks repeated their rank 0's batches"
    # each rank sends its half of the pseudo-gradient to the other group: the link carries the model once
    # per group, not once per rank (rank 0's count; rank 1 sends the other half)
    assert {r["sent_bytes"] for r in two_records[0]} == {one_records[0][0]["sent_bytes"] // 2}, two_records[0]
    # the 2-rank groups' checkpoints are sharded (each rank wrote its part) and load into FSDP groups
    assert (tmp_path / "ckpt-x2" / "step_00000003" / "global" / ".metadata").exists()
    fsdp = checksums(fleet_records(tmp_path, nproc=2, outer_steps=4, extra=["--parallel", "fsdp"], ckpt_tag="-x2"))
    assert list(fsdp[0]) == [4] and fsdp[0] == fsdp[1], fsdp


@pytest.mark.slow
def test_groups_of_two_and_one_ranks_stop_at_their_first_sync_in_one_line(tmp_path):
    """Groups submitted apart (the components refuse the mix before launch when they see every group): a 2-rank
    and a 1-rank group. Rank 1 of the first has no peer in the second; both groups stop at their first exchange
    (the initial-weight agreement) with the line that names the number of ranks, neither trains."""
    lighthouse = Lighthouse(tmp_path, min_replicas=2)
    args = [*ARGS, "--outer-steps", "3", "--checkpoint-dir", str(tmp_path / "ckpt"), "--collective-timeout", "15"]
    groups = [Group(0, 2, lighthouse.url, args, tmp_path, nproc=2), Group(1, 2, lighthouse.url, args, tmp_path)]
    try:
        codes = [g.wait(180) for g in groups]
    finally:
        lighthouse.kill()
    line = "the number of ranks per group differ"
    for g, rc in zip(groups, codes, strict=True):
        assert rc != 0 and line in g.output(), g.output()[-3000:]
        assert "Number of outer optimizer steps completed" not in g.output()
    assert groups[1].output().strip().splitlines()[-1].startswith("torchx_diloco.train: error: the groups of this run")


@pytest.mark.slow
def test_fsdp_groups_shard_the_model_and_agree(tmp_path):
    """--parallel fsdp: 2 groups x 2 ranks, FSDP2 over each group's ranks; each rank syncs its own shard with
    the same rank of the other group (half the bytes each) and the groups agree at every outer step."""
    records = fleet_records(tmp_path, nproc=2, extra=["--parallel", "fsdp"])
    sums = checksums(records)
    assert list(sums[0]) == [1, 2, 3] and sums[0] == sums[1], sums
    assert len(set(sums[0].values())) == 3
    torch.manual_seed(0)
    model_bytes = 4 * sum(p.numel() for p in build_model("nano", block_size=SEQ).parameters())
    sent = {r["sent_bytes"] for r in records[0]}  # rank 0's shard: about half the model (FSDP pads rows)
    assert len(sent) == 1 and 0.4 * model_bytes < sent.pop() < 0.6 * model_bytes, (sent, model_bytes)
    # every rank wrote its shards of each step (DCP); the steps load into one-rank groups, resharded
    step3 = tmp_path / "ckpt-x2parallelfsdp" / "step_00000003"
    assert {p.name for p in (step3 / "global").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    store = CheckpointStore(str(step3.parent))
    values = store.read_part(3, GLOBAL_PART)  # verified against the manifest written last
    assert values["outer_step"] == 3 and store.at(3, 0).sharded == {GLOBAL_PART, "replica_group_0"}
    resumed = fleet_records(tmp_path, nproc=1, outer_steps=4, ckpt_tag="-x2parallelfsdp")
    assert [r["outer_step"] for r in resumed[0]] == [4] and checksums(resumed)[0] == checksums(resumed)[1]
    # the group part came along: the inner steps go on from 3 x 4, and the loss from where it was
    assert resumed[0][0]["inner_steps"] == 16, resumed[0]
    assert resumed[0][0]["loss"] < records[0][0]["loss"], (resumed[0][0], records[0])


def write_newer_step(ckpt: Path, step: int, lighthouse: str) -> None:
    """What the peers of a group left behind would have published: global weights at outer step ``step``, in a
    manifest of their run (groups without a run id are their lighthouse's)."""
    torch.manual_seed(0)
    model = build_model("nano", block_size=SEQ)
    _, outer = build_optimizers(model, 1e-3, 0.7, 0.9, 0.1)
    weights = {name: torch.full_like(p, 0.01) for name, p in model.named_parameters()}
    CheckpointStore(str(ckpt)).write_part(
        step,
        GLOBAL_PART,
        {
            "manager": {"step": step, "batches_committed": 2 * step},
            "diloco": {"global_weights": weights, "outer_optimizer": outer.state_dict()},
        },
        run=run_identity(None, lighthouse),
    )


@pytest.mark.slow
def test_a_group_of_two_ranks_catches_up_with_storage_as_one(tmp_path):
    """A 2-rank group whose peers published outer step 5 after it started adopts that step at its next sync, on
    rank 0's word (its log says so once), and both ranks train on from there to the end together."""
    staging = tmp_path / "staging"
    lighthouse = Lighthouse(tmp_path, min_replicas=1)
    write_newer_step(staging, 5, lighthouse.url)
    ckpt = tmp_path / "ckpt"
    args = [*SMALL, "--device", "cpu", "--sync-every", "16", "--outer-steps", "7", "--group-wait", "2"]
    group = Group(0, 2, lighthouse.url, [*args, "--checkpoint-dir", str(ckpt)], tmp_path, nproc=2)
    # both ranks have looked for a checkpoint to resume from (they did before joining) and found none
    deadline = time.monotonic() + 60
    while group.output().count("groups reached the lighthouse") < 2:
        assert time.monotonic() < deadline and group.proc.poll() is None, group.output()[-3000:]
        time.sleep(0.05)
    step_dir = CheckpointStore(str(staging)).step_dir(5)
    Path(step_dir).rename(CheckpointStore(str(ckpt)).step_dir(5))  # published at once, complete
    assert group.wait(120) == 0, group.output()[-3000:]
    lighthouse.kill()
    steps = [r["outer_step"] for r in committed(read_metrics(metrics_url(ckpt, 0)))]
    assert 5 not in steps and steps[-2:] == [6, 7] and max(steps[:-2], default=0) < 5, steps
    assert group.output().count("its peers published step 5: adopting it") == 1, group.output()[-3000:]


@pytest.mark.slow
def test_two_rank_groups_stream_int8_and_a_killed_rank_heals(tmp_path):
    """2 groups x 2 ranks (ddp, the pseudo-gradient split across ranks) with 2 fragments, overlap 1 and int8:
    rank 1 of group 1 is SIGKILLed mid-run; torchrun restarts the group's ranks, which come back (from their
    checkpoint or a peer) and train to the end; both groups hold one set of global weights at every common step.
    """
    # min 2 groups per step: group 0 waits for group 1's return instead of racing alone to the end (a loaded
    # machine once took longer to restart group 1 than group 0 took to finish), so a short run will do
    lighthouse = Lighthouse(tmp_path, min_replicas=2)
    ckpt = tmp_path / "ckpt"
    streaming = ["--fragments", "2", "--overlap-steps", "1", "--codec", "int8"]
    args = [*SMALL, "--device", "cpu", "--sync-every", "8", "--outer-steps", "16", "--min-replicas", "2"]
    args += ["--checkpoint-dir", str(ckpt), *streaming]
    groups = [Group(g, 2, lighthouse.url, args, tmp_path, nproc=2, max_restarts=2) for g in range(2)]
    victim_metrics = metrics_url(ckpt, 1)
    deadline = time.monotonic() + 90
    while not (Path(victim_metrics).exists() and len(committed(read_metrics(victim_metrics))) >= 5):
        assert time.monotonic() < deadline, groups[1].output()[-3000:]
        time.sleep(0.1)
    workers = groups[1].workers()
    assert len(workers) == 2, workers
    assert kill_pid(workers[1]), "group 1's rank 1 was gone before the kill"  # in the middle of whatever it did
    for g in groups:
        assert g.wait(150) == 0, g.output()[-3000:]
    lighthouse.kill()
    sums = checksums({g: committed(read_metrics(metrics_url(ckpt, g))) for g in range(2)})
    assert max(sums[0]) == max(sums[1]) == 16, (sorted(sums[0])[-3:], sorted(sums[1])[-3:])
    common = sorted(set(sums[0]) & set(sums[1]))
    assert len(common) >= 10 and all(sums[0][s] == sums[1][s] for s in common), (sums[0], sums[1])
    out = groups[1].output()
    # torchrun saw the group fail, and restarted it: it names the first failure it observed, which under load can be
    # rank 0's (its collective broke when rank 1 died) rather than rank 1's own -9
    assert re.search(r"failed \(exitcode: -?\d+\) local_rank: [01]", out), out[-3000:]
    assert "group 1 resumed from" in out or "healed from a peer" in out, out[-3000:]


@pytest.mark.slow
def test_a_two_rank_group_with_dropout_resumes_as_if_never_stopped(tmp_path, faulty_url):
    """One group of 2 ranks, a model with dropout whose random stream differs per rank: a run killed after outer
    step 2 (held at step 3's checkpoint write, so it cannot have gone further) and resumed ends bit for bit where
    an uninterrupted run ends. The sharded group part keeps each rank's RNG (with one rank's for both, rank 1's
    dropout masks after the resume would be rank 0's)."""
    # serves the three runs one after the other: a run's heartbeats hold the next one's first quorum until they
    # expire (1.5 s here, not 5 s)
    lighthouse = Lighthouse(tmp_path, min_replicas=1, idle_exit=0, extra=["--heartbeat-timeout-ms", "1500"])
    model = ["--model", "tests.model_factories:rank_dependent_dropout", "--seq-len", str(SEQ), "--batch-size", "4"]
    args = [*model, "--eval-batches", "0", "--device", "cpu", "--sync-every", "4", "--group-wait", "0"]
    args += ["--outer-steps", "4"]
    hold = {FAULTS_ENV: json.dumps([{"match": "step_00000003/", "action": "hold", "until": str(tmp_path / "go")}])}

    def group(ckpt: str, tag: str, faults: Optional[Dict[str, str]] = None) -> Group:
        env = {"PYTHONPATH": str(REPO), **(faults or {})}  # the factory is in tests/
        return Group(0, 1, lighthouse.url, [*args, "--checkpoint-dir", ckpt], tmp_path, env, tag=tag, nproc=2)

    def weights(folder: Path) -> Dict[int, str]:
        return {r["outer_step"]: r["weights_sha"] for r in committed(read_metrics(metrics_url(folder, 0)))}

    whole = group(str(tmp_path / "whole"), "whole")
    assert whole.wait(120) == 0, whole.output()[-3000:]
    folder = Path(faulty_url.removeprefix("faulty://"))
    first = group(faulty_url, "first", hold)
    deadline = time.monotonic() + 120
    while 2 not in weights(folder):  # step 2's parts and metrics are written; step 3's write waits for "go"
        assert time.monotonic() < deadline and first.proc.poll() is None, first.output()[-3000:]
        time.sleep(0.1)
    first.kill()
    from torchx_diloco.checkpoint.dcp import saved_keys

    store = CheckpointStore(faulty_url)
    assert {"rng_rank_0", "rng_rank_1"} <= saved_keys(store.sharded_url(2, "replica_group_0"))
    second = group(faulty_url, "second")
    assert second.wait(120) == 0, second.output()[-3000:]
    lighthouse.kill()
    assert "group 0 resumed from" in second.output() and "(outer step 2)" in second.output(), second.output()
    assert weights(folder)[4] == weights(tmp_path / "whole")[4]
