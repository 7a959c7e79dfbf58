"""``python -m torchx_diloco.train``: one replica group of a DiLoCo run, assembled from the package's parts.

Run it once per group (the TorchX components do, under torchrun) against one torchft lighthouse.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
import warnings
from datetime import timedelta
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from torchx_diloco.checkpoint import GLOBAL_PART, AsyncWriter, Checkpoint, CheckpointStore, group_part
from torchx_diloco.cluster import (
    build_manager,
    check_lighthouse_serves_run,
    end_run_on_user_error,
    group_rank,
    group_world_size,
    init_group_process_group,
    pick_device,
    rank0_decides,
    wait_for_groups,
    wait_for_lighthouse,
)
from torchx_diloco.config import TrainConfig, parse_config
from torchx_diloco.data import Corpus, eval_batches
from torchx_diloco.diloco import DiLoCo, local_tensor
from torchx_diloco.errors import UserError
from torchx_diloco.metrics import MetricsLog, TensorBoardLog, print_outer_step, progress_bar, weights_checksum
from torchx_diloco.modeling import (
    build_model,
    check_against_data,
    data_vocab_size,
    fingerprint,
    fingerprint_mismatch,
    forward_loss,
)
from torchx_diloco.torchft_diloco import TorchftDiLoCo

logger = logging.getLogger("torchx_diloco")


def inner_lr(step: int, peak: float, total_steps: int, warmup_steps: Optional[int] = None) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak, over all inner steps of the run.

    ``warmup_steps`` defaults to 5% of the run, at most 1000 (the paper's).
    """
    warmup = warmup_steps if warmup_steps is not None else min(1000, total_steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def build_optimizers(
    model: nn.Module, inner_lr: float, outer_lr: float, outer_momentum: float, weight_decay: float
) -> Tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The paper's pair: AdamW (decay on matrices only) inside, SGD with Nesterov momentum outside."""
    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=inner_lr,
        betas=(0.9, 0.95),
    )
    outer = torch.optim.SGD(params, lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)
    return inner, outer


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 over the group's ranks: each repeated block (a child of an ``nn.ModuleList``: a GPT's or a Hugging
    Face model's layers) is one unit, the rest (embeddings, head) the root's. Returns the same module."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)
    return model


def state_bytes(model: nn.Module, inner: Any, outer: Any, backups: List[torch.Tensor]) -> Dict[str, int]:
    """Bytes of training state this rank holds (its own shards under FSDP): parameters, the global weights' backup,
    the outer momentum and the AdamW moments (the metrics' ``state_bytes``; benchmarks/bench_groups.py)."""
    size = lambda ts: sum(local_tensor(t).numel() * t.element_size() for t in ts)  # noqa: E731
    held = lambda o: [v for s in o.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]  # noqa: E731
    return {
        "params": size(model.parameters()),
        "backups": size(backups),
        "outer_momentum": size(held(outer)),
        "adamw_moments": size(held(inner)),
    }


_CHECKPOINT_TIMEOUT_S = 1800  # a sharded write waits for the slowest rank's storage, and the global part for peers


def reshard(model: nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward (an evaluation): shard them
    again, or the model lists the gathered tensors instead of the parameters the optimizers hold (and a
    checkpoint of the optimizers' state by parameter name fails)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _to_cpu(obj: Any) -> Any:
    """A detached CPU copy of a (nested) state dict, safe to serialise while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class Trainer:
    """Owns one group's model, optimizers, data position and durable state; ``run()`` trains to the end."""

    diloco: DiLoCo | TorchftDiLoCo  # set by join(): ours or torchft's (--impl)

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.group = cfg.replica_group_id
        self.is_group_leader = group_rank() == 0
        self.device = pick_device(cfg.device)
        self.store = CheckpointStore(cfg.checkpoint_dir, cfg.keep_checkpoints)
        if self.is_group_leader:
            self.store.check_writable()

        corpus = Corpus.load(cfg.data, cfg.seq_len, cfg.eval_data)
        # each rank its own part of the group's shard: G ranks train on G times the tokens, none twice
        self.shard = corpus.shard(self.group, cfg.num_replica_groups, cfg.seq_len, group_rank(), group_world_size())
        self.eval_tokens = corpus.eval
        self.data_seed = cfg.seed * 7919 + self.group

        torch.manual_seed(cfg.seed)  # the same initial weights in every group (join() makes sure of it)
        self.model = build_model(cfg.model, cfg.model_args, cfg.seq_len).to(self.device)
        check_against_data(self.model, cfg.model, data_vocab_size(corpus), cfg.seq_len, self.device)
        self.fingerprint = fingerprint(self.model, cfg.model, cfg.model_args)
        self.train_model = self._wrap_for_group(self.model)
        # --compile wraps the module: same parameters, so the optimizers and DiLoCo keep the originals
        self.forward_model = torch.compile(self.train_model) if cfg.compile else self.train_model
        self.tensorboard = (
            TensorBoardLog(cfg.tensorboard, self.group, cfg.steps_per_outer_step)
            if cfg.tensorboard and self.is_group_leader
            else None
        )
        self.inner_opt, self.outer_opt = build_optimizers(
            self.model, cfg.inner_lr, cfg.outer_lr, cfg.outer_momentum, cfg.weight_decay
        )
        self.position = 0  # batches this group has drawn from its shard
        self.inner_steps = 0  # inner steps this group has taken

        if cfg.impl == "torchft" and group_world_size() > 1:
            raise UserError("--impl torchft runs groups of one rank here: use --impl torchx_diloco for several ranks")
        # rank 0 picks the step to resume from (verifying it), the group's other ranks read that very step
        newest = self.store.latest(self.group) if self.is_group_leader else None
        step = rank0_decides(newest.step if newest is not None else 0, self.device)
        if not self.is_group_leader:
            newest = self.store.at(step, self.group, verify=False) if step else None
        self.resume_from = newest
        if self.resume_from is not None:
            self._check_shape(self.resume_from)
            if self.cfg.parallel == "fsdp" and GLOBAL_PART not in self.resume_from.sharded and group_world_size() > 1:
                raise UserError(
                    f"the checkpoint at {self.store.step_dir(step)} was written by one-rank groups (one file): an fsdp "
                    "group of several ranks resumes only from a sharded one; resume it once with --parallel ddp "
                    "(its checkpoints are sharded from then on) or pass a new --checkpoint-dir"
                )

    def _wrap_for_group(self, model: nn.Module) -> nn.Module:
        """Several ranks in one group (e.g. one per GPU) train as DDP, or FSDP2, between syncs."""
        self.split_group = None  # ddp: the group's ranks split the pseudo-gradient over this process group
        self.checkpoint_group = None  # several ranks: they write and read sharded checkpoints over this one
        if group_world_size() == 1 and self.cfg.parallel == "ddp":
            return model
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":  # NCCL's own collectives (barrier, objects) use the current device
            torch.cuda.set_device(self.device)
        if "MASTER_ADDR" in os.environ:  # torchrun's
            init_group_process_group(backend)
        elif not dist.is_initialized():  # fsdp in a one-rank group started by hand: a world of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        if group_world_size() > 1:  # the checkpoint writer's collectives run beside training's: a group of their own
            self.checkpoint_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=_CHECKPOINT_TIMEOUT_S))
        if self.cfg.parallel == "fsdp":
            return shard_model(model)
        # DiLoCo's all-gather runs beside DDP's all-reduces (overlapped syncs): a process group of its own
        self.split_group = dist.new_group(backend=backend, timeout=timedelta(seconds=self.cfg.collective_timeout))
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _check_shape(self, ckpt: Checkpoint) -> None:
        saved = ckpt.global_state.get("model_fingerprint")
        if saved is not None:
            differs = fingerprint_mismatch(saved, self.fingerprint)
        else:  # written before fingerprints: a preset's config
            legacy, to_dict = (
                ckpt.global_state.get("model_config"),
                getattr(getattr(self.model, "cfg", None), "to_dict", None),
            )
            mine = to_dict() if to_dict is not None else None
            differs = None if legacy is None or legacy == mine else f"{legacy} there, {mine} here"
        if differs is not None:
            raise UserError(
                f"the checkpoint at {self.store.step_dir(ckpt.step)} is for a different model ({differs}): "
                "pass the same --model, --model-args and --seq-len, or a new --checkpoint-dir"
            )

    # --- joining -----------------------------------------------------------------------------------------
    def join(self) -> None:
        cfg = self.cfg
        wait_for_lighthouse(cfg.lighthouse, cfg.lighthouse_timeout)
        check_lighthouse_serves_run(cfg.lighthouse, cfg.run_id)  # before our heartbeats reach another run's
        self.manager = build_manager(
            self.group,
            self.device,
            cfg.min_replicas,
            cfg.collective_timeout,
            cfg.quorum_timeout,
            cfg.lighthouse,
            run_id=cfg.run_id,
        )
        # checks, at least once, that the lighthouse serves this run and no group of it failed for good
        wait_for_groups(
            cfg.lighthouse, cfg.num_replica_groups if cfg.group_wait > 0 else 1, cfg.group_wait, self.group, cfg.run_id
        )
        # the outer loop's schedule, the same for ours and torchft's
        parts = (self.manager, self.model, self.inner_opt, self.outer_opt)
        schedule: Dict[str, Any] = dict(
            sync_every=cfg.sync_every, fragments=cfg.fragments, overlap_steps=cfg.overlap_steps, mix_alpha=cfg.mix_alpha
        )
        if cfg.impl == "torchx_diloco":
            self.diloco = DiLoCo(
                *parts, **schedule, codec=cfg.codec, quorum_retry_s=cfg.lighthouse_timeout, split_group=self.split_group
            )
        else:
            self.diloco = TorchftDiLoCo(*parts, **schedule)
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif isinstance(self.diloco, DiLoCo) and cfg.num_replica_groups > 1:
            # a fresh run: the groups start from one set of weights even if the factory made them differ
            self.diloco.agree_initial_weights()

    def _restore(self, ckpt: Checkpoint) -> None:
        self._load_global_state(ckpt.step, ckpt.global_state, GLOBAL_PART in ckpt.sharded, newer=False)
        if ckpt.group_state is None:
            logger.warning(
                "checkpoint step %d has no part for group %d: its inner optimizer starts afresh", ckpt.step, self.group
            )
        elif group_part(self.group) in ckpt.sharded:
            self._load_group_shards(ckpt.step, ckpt.group_state)
        else:
            self.inner_opt.load_state_dict(ckpt.group_state["inner_optimizer"])
            local = ckpt.group_state.get("local_weights")
            if local is not None:  # streaming or mixing: the model was not at the global weights then
                with torch.no_grad():
                    for name, p in self.model.named_parameters():
                        if name in local:
                            p.copy_(local[name])
            self.position = ckpt.group_state["data_position"]
            self.inner_steps = ckpt.group_state["inner_steps"]
            torch.set_rng_state(ckpt.group_state["rng"])
        if self.is_group_leader:
            logger.info(
                "group %d resumed from %s (outer step %d)", self.group, self.store.step_dir(ckpt.step), ckpt.step
            )

    def _load_global_state(self, step: int, values: Dict[str, Any], sharded: bool, newer: bool) -> None:
        """The manager's and DiLoCo's state of ``step``: from one file, or every rank its shards (resharded)."""
        self.manager.load_state_dict(values["manager"])
        if sharded:
            target = self._ours().distributed_state_dict()
            self.store.load_sharded_part(step, GLOBAL_PART, target, self.checkpoint_group)
            self._ours().load_distributed_state_dict(target, newer=newer)
        elif newer:
            self._ours().adopt_newer_global_state(values["diloco"])
        else:
            self.diloco.load_state_dict(values["diloco"])

    def _ours(self) -> DiLoCo:
        assert isinstance(self.diloco, DiLoCo), "only --impl torchx_diloco catches up with storage or shards its state"
        return self.diloco

    def _group_shards(self, local_weights: bool) -> Dict[str, Any]:
        """This group's state that DCP holds: the inner optimizer (keyed by parameter name: any layout loads it),
        the RNG, and the local weights when they differ from the global ones."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        shards: Dict[str, Any] = {
            "inner_optimizer": get_optimizer_state_dict(self.model, self.inner_opt),
            "rng": torch.get_rng_state(),
        }
        if local_weights:
            shards["local_weights"] = get_model_state_dict(self.model)
        return shards

    def _load_group_shards(self, step: int, values: Dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        shards = self._group_shards(bool(values.get("local_weights")))
        self.store.load_sharded_part(step, group_part(self.group), shards, self.checkpoint_group)
        set_optimizer_state_dict(self.model, self.inner_opt, shards["inner_optimizer"])
        if "local_weights" in shards:
            set_model_state_dict(self.model, shards["local_weights"])
        torch.set_rng_state(shards["rng"])
        self.position = values["data_position"]
        self.inner_steps = values["inner_steps"]

    # --- training ----------------------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        self.join()
        self.writer = AsyncWriter()
        self.publish_now = threading.Event()  # set while the loop waits for the writer (see _before_sync)
        self.metrics = MetricsLog(
            f"{cfg.checkpoint_dir.rstrip('/')}/metrics/{group_part(self.group)}.jsonl", self.tensorboard
        )
        bar = progress_bar(cfg.outer_steps, self.manager.current_step(), self.group)
        loss_sum, window_start, window_steps = torch.zeros((), device=self.device), time.perf_counter(), 0
        sync_s = 0.0  # time the loop stood still for the sync this window (sending, then applying)
        while self.manager.current_step() < cfg.outer_steps:
            step = self.manager.current_step() * cfg.steps_per_outer_step + self.diloco.local_step
            for group in self.inner_opt.param_groups:
                group["lr"] = inner_lr(step, cfg.inner_lr, cfg.total_inner_steps, cfg.warmup_steps)
            loss = self._accumulate_gradients()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            syncing, applying = self.diloco.sync_due, self.diloco.local_step + 1 >= self.diloco.steps_per_sync
            if syncing:
                self._before_sync(starts_quorum=self.diloco.quorum_due)
                if self.manager.current_step() >= cfg.outer_steps:
                    break  # the peers finished the run without us
            t0 = time.perf_counter()
            self.inner_opt.step()  # (torchft's implementation syncs inside this call)
            self.inner_opt.zero_grad(set_to_none=True)
            self.inner_steps += 1
            window_steps += 1
            loss_sum += loss.detach()
            committed = self.diloco.step()
            if syncing:
                sync_s += time.perf_counter() - t0
            if not applying:
                continue
            sync = {"sync_s": sync_s, **self.diloco.last_sync}
            if committed:
                self._after_commit(
                    float(loss_sum) / window_steps, window_steps, time.perf_counter() - window_start, sync
                )
                bar.update(1)
            else:
                self._record({"outer_step": self.manager.current_step() + 1, "committed": False, "sync_s": sync_s})
            loss_sum, window_start, window_steps = torch.zeros((), device=self.device), time.perf_counter(), 0
            sync_s = 0.0
        held = state_bytes(self.model, self.inner_opt, self.outer_opt, self.diloco.global_weights())
        logger.info("group %d rank %d holds training state of %s bytes", self.group, group_rank(), held)
        self.diloco.close()
        bar.close()
        self.writer.close()
        self.metrics.close()
        self.manager.shutdown(wait=False)
        if self.is_group_leader:
            print(f"DiLoCo: group {self.group} finished at outer step {self.manager.current_step()}", flush=True)
        return 0

    def _before_sync(self, starts_quorum: bool) -> None:
        """What must happen just before a sync: the writer may be reading the global state the sync rewrites;
        before its quorum, the lighthouse must still serve this run and a group left behind catches up with
        storage (never while a fragment is in flight)."""
        # A group part that never comes (its group died or did not commit) must not hold this loop back: peers
        # behind would meanwhile form a quorum of their own and commit the same step differently
        self.publish_now.set()
        self.writer.wait()
        self.publish_now.clear()
        if not starts_quorum:
            return
        check_lighthouse_serves_run(self.cfg.lighthouse, self.cfg.run_id)
        if self._catch_up_with_storage():
            # this step's gradient was computed on the weights just replaced: keep it out of AdamW's moments
            self.inner_opt.zero_grad(set_to_none=True)

    def _catch_up_with_storage(self) -> bool:
        """A group left behind (frozen, or back after its peers moved on or even finished) must not train on
        alone from stale weights and overwrite their checkpoints: if storage holds a newer step, adopt it."""
        if self.cfg.num_replica_groups == 1 or not isinstance(self.diloco, DiLoCo):
            return False
        # rank 0 looks at storage and the group's other ranks follow: ranks that saw storage at different
        # moments would otherwise adopt different steps (or only some of them would) and part ways
        ckpt, adopt = None, 0
        if self.is_group_leader and self.store.newest_published_step() > self.manager.current_step():
            ckpt = self.store.latest(self.group)
            if ckpt is not None and ckpt.step > self.manager.current_step():
                adopt = ckpt.step
        adopt = rank0_decides(adopt, self.device)
        if adopt == 0:
            return False
        # the other ranks read the very step rank 0 chose (and verified)
        at = ckpt if ckpt is not None else self.store.at(adopt, self.group, verify=False)
        if self.is_group_leader:
            logger.warning(
                "group %d is at outer step %d but its peers published step %d: adopting it",
                self.group,
                self.manager.current_step(),
                adopt,
            )
        self._load_global_state(adopt, at.global_state, GLOBAL_PART in at.sharded, newer=True)
        return True

    def _autocast(self) -> contextlib.AbstractContextManager:
        """--dtype bf16: the forward and the loss under autocast; the weights and gradients stay fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bf16")

    def _accumulate_gradients(self) -> torch.Tensor:
        """One inner step's gradients: --grad-accum micro-batches of --batch-size, each loss scaled by 1/K (the
        data position advances K batches). Returns the mean loss over the micro-batches."""
        cfg, k = self.cfg, self.cfg.grad_accum
        total = torch.zeros((), device=self.device)
        for i in range(k):
            x, y = self.shard.batch(self.position, cfg.batch_size, cfg.seq_len, self.data_seed)
            self.position += 1
            # DDP in a group of several ranks: all-reduce the gradients once, after the last micro-batch
            no_sync = getattr(self.train_model, "no_sync", None)
            with no_sync() if no_sync is not None and i < k - 1 else contextlib.nullcontext():
                with self._autocast():
                    loss = forward_loss(self.forward_model, x.to(self.device), y.to(self.device))
                (loss / k).backward()
            total += loss.detach().float()
        return total / k

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.cfg.eval_batches == 0:
            return None
        self.model.eval()
        with self._autocast():
            losses = [
                forward_loss(self.model, x.to(self.device), y.to(self.device)).float().item()
                for x, y in eval_batches(self.eval_tokens, self.cfg.batch_size, self.cfg.seq_len, self.cfg.eval_batches)
            ]
        self.model.train()
        reshard(self.model)
        return sum(losses) / len(losses)

    def _after_commit(self, loss: float, window_steps: int, window_s: float, sync: Dict[str, Any]) -> None:
        cfg, step = self.cfg, self.manager.current_step()
        # every rank of the group reads its own part of the group's shard: the group's distinct tokens
        tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len * group_world_size()
        record = {
            "outer_step": step,
            "committed": True,
            "inner_steps": self.inner_steps,
            "tokens": self.inner_steps * tokens_per_step,  # this group's, since the run began
            "loss": loss,
            "eval_loss": self.evaluate(),
            "participants": self.manager.num_participants(),
            "tokens_per_s": window_steps * tokens_per_step / window_s,
            **sync,  # sync_s (the time training stood still for it), fragment, sent_bytes
            "state_bytes": state_bytes(self.model, self.inner_opt, self.outer_opt, self.diloco.global_weights()),
        }
        if self.is_group_leader:
            print_outer_step(self.inner_steps, step, loss)
        if step % cfg.checkpoint_every == 0 or step == cfg.outer_steps:
            self._checkpoint(step, record)
        else:
            self._record(record)

    def _record(self, record: Dict[str, Any]) -> None:
        if not self.is_group_leader:
            return
        record = {**record, "group": self.group, "time": time.time()}
        weights = self.diloco.global_weights() if record["committed"] else None

        def job() -> None:
            if weights is not None:
                record["weights_sha"] = weights_checksum(weights)
            self.metrics.write(record)

        self.writer.submit(job, f"metrics of outer step {record['outer_step']}")

    def _checkpoint(self, step: int, record: Dict[str, Any]) -> None:
        """Queue this step's durable state; the global part is written by the quorum's first group only."""
        if self.checkpoint_group is not None:
            self._checkpoint_sharded(step, record)
            return
        if not self.is_group_leader:
            return
        writes_global = self.manager.participating_rank() == 0
        participants = self.manager.num_participants()
        global_state = {
            "outer_step": step,
            "model_fingerprint": self.fingerprint,
            "manager": self.manager.state_dict(),
            "diloco": self.diloco.state_dict(),  # references: the writer is waited for before the next sync
        }
        group_state = {
            "inner_optimizer": _to_cpu(self.inner_opt.state_dict()),
            "data_position": self.position,
            "inner_steps": self.inner_steps,
            "rng": torch.get_rng_state(),
        }
        if self.diloco.local_differs_from_global:  # a resume must restore the local weights too
            group_state["local_weights"] = _to_cpu(dict(self.model.named_parameters()))
        record = {**record, "group": self.group, "time": time.time()}
        weights = self.diloco.global_weights()

        def job() -> None:
            record["weights_sha"] = weights_checksum(weights)
            try:
                started = time.perf_counter()
                self.store.write_part(step, group_part(self.group), group_state)
                if writes_global:
                    # peers write their parts at the same time as ours; one that died meanwhile never will
                    patience = max(10.0, 5 * (time.perf_counter() - started))
                    self.store.wait_for_group_parts(step, participants, patience, stop=self.publish_now)
                    self.store.write_part(step, GLOBAL_PART, global_state)
                    self.store.prune()
                record["checkpoint"] = self.store.step_dir(step)
            finally:  # the metrics line is written even when storage failed (then without "checkpoint")
                self.metrics.write(record)

        self.writer.submit(job, f"checkpoint of outer step {step}")

    def _checkpoint_sharded(self, step: int, record: Dict[str, Any]) -> None:
        """A group of several ranks: every rank writes its shards (torch.distributed.checkpoint), in the background,
        over the group's checkpoint process group; rank 0 writes the manifests, last."""
        writes_global = bool(rank0_decides(int(self.manager.participating_rank() == 0), self.device))
        participants, leader = self.manager.num_participants(), self.is_group_leader
        global_values = {
            "outer_step": step,
            "model_fingerprint": self.fingerprint,
            "manager": self.manager.state_dict(),
        }
        global_shards = self._ours().distributed_state_dict()  # references: the writer is waited for before a sync
        local_weights = self.diloco.local_differs_from_global
        group_shards = _to_cpu(self._group_shards(local_weights))  # copies: the inner steps go on meanwhile
        group_values = {"data_position": self.position, "inner_steps": self.inner_steps, "local_weights": local_weights}
        record = {**record, "group": self.group, "time": time.time()}
        weights = self.diloco.global_weights()
        pg = self.checkpoint_group

        def job() -> None:
            try:
                if leader:
                    record["weights_sha"] = weights_checksum(weights)
                started = time.perf_counter()
                self.store.write_sharded_part(step, group_part(self.group), group_shards, group_values, pg)
                if writes_global:
                    if leader:  # the group's other ranks wait for it inside the next write's barrier
                        patience = max(10.0, 5 * (time.perf_counter() - started))
                        self.store.wait_for_group_parts(step, participants, patience, stop=self.publish_now)
                    self.store.write_sharded_part(step, GLOBAL_PART, global_shards, global_values, pg)
                    if leader:
                        self.store.prune()
                record["checkpoint"] = self.store.step_dir(step)
            finally:
                if leader:
                    self.metrics.write(record)

        self.writer.submit(job, f"checkpoint of outer step {step}")


def configure_logging() -> None:
    """Our INFO lines, the libraries' warnings, minus two harmless ones a group prints at every heal on CPU."""
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs every quorum at INFO otherwise
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "WARNING").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("torchx_diloco").setLevel(os.environ.get("TORCHX_DILOCO_LOGLEVEL", "INFO").upper())
    # torchft, after every quorum change on a torch built without NCCL (the CPU wheel): no NCCL trace to reset
    logging.getLogger("torchft.manager").addFilter(lambda r: "NCCL flight recorder" not in r.getMessage())
    # torch, on reading a healing peer's weights: they are only read (copied into our global weights)
    warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def main(argv: Optional[List[str]] = None) -> int:
    configure_logging()
    try:
        cfg = parse_config(argv)
        return Trainer(cfg).run()
    except UserError as e:
        print(f"torchx_diloco.train: error: {e}", file=sys.stderr, flush=True)
        end_run_on_user_error()
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
