"""A replica group's checkpointing, as torchtitan's trainer sees its own: ``open`` at start, ``load`` once joined,
``save(step)`` after a commit, ``catch_up`` before a quorum.

The format follows the group's layout: one rank writes one file per part (torch.save, format 1); several ranks
(ddp or fsdp) write DCP shards each (format 3), over a Gloo process group of their own so the writes run beside
training's collectives. Either way the work runs on the background writer, the metrics line of the step goes out
after the step's parts, and the global part is written by the quorum's first group only, once every group of the
quorum published its part (or a patience ran out).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from torchx_diloco.checkpoint.store import GLOBAL_PART, Checkpoint, CheckpointStore, group_part, part_patience
from torchx_diloco.checkpoint.writer import AsyncWriter
from torchx_diloco.cluster import group_rank, group_world_size, rank0_decides
from torchx_diloco.config import CheckpointConfig
from torchx_diloco.errors import UserError
from torchx_diloco.lease import Lease
from torchx_diloco.metrics import MetricsLog, TensorBoardLog, weights_checksum
from torchx_diloco.modeling import fingerprint_mismatch
from torchx_diloco.outer_loop import OuterLoop
from torchx_diloco.sigterm import on_sigterm

logger = logging.getLogger(__name__)


def _dcp() -> Any:
    """The sharded (DCP) format, imported when a group of several ranks first needs it: importing
    torch.distributed.checkpoint takes about a second, which every one-rank group would pay at start."""
    from torchx_diloco.checkpoint import dcp

    return dcp


CHECKPOINT_TIMEOUT_S = 1800  # a sharded write waits for the slowest rank's storage, and the global part for peers


@dataclass
class Progress:
    """How far this group got: batches drawn from its shard, inner steps taken."""

    position: int = 0
    inner_steps: int = 0


@dataclass
class TrainState:
    """The live objects a checkpoint saves and restores (references, not copies)."""

    model: nn.Module
    inner_optimizer: torch.optim.Optimizer
    manager: Any
    outer: OuterLoop
    progress: Progress


def to_cpu(obj: Any) -> Any:
    """A detached CPU copy of a (nested) state dict, safe to serialise while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class Checkpointer:
    """One group's checkpoints and metrics in ``cfg.dir``; rank 0 decides what every rank of the group reads."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        group: int,
        run: str,
        device: torch.device,
        tensorboard: Optional[TensorBoardLog] = None,
    ) -> None:
        self.group, self.run, self.device = group, run, device
        self.leader = group_rank() == 0
        self.store = CheckpointStore(cfg.dir, cfg.keep)
        self.every = cfg.every
        # the run's hold on the folder: the group's rank 0 takes it once the group is ready to train (open)
        self.lease = Lease(cfg.dir, run, cfg.lease_s) if self.leader else None
        self.take_over = cfg.take_over
        if self.lease is not None:
            self.lease.check(cfg.take_over)  # refused: nothing of the holder's folder changes
            self.store.check_writable()  # fail now, with one line, rather than at the first outer step
        self.metrics = MetricsLog(f"{cfg.dir.rstrip('/')}/metrics/{group_part(group)}.jsonl", tensorboard)
        self.writer = AsyncWriter()
        self.publish_now = threading.Event()  # set while the loop waits for the writer (see before_sync)
        self.fingerprint: Dict[str, Any] = {}
        self.resume_from: Optional[Checkpoint] = None
        self._forget_sigterm: Callable[[], None] = lambda: None
        self._pg: Optional[Any] = None  # several ranks: they write and read DCP shards over this process group

    # --- start -------------------------------------------------------------------------------------------
    def open(self, model: nn.Module, fingerprint: Dict[str, Any], sharded_only: bool) -> Optional[Checkpoint]:
        """Pick the step to resume from: rank 0 chooses (and verifies) it, the group's other ranks read that very
        step. A step of another model, or (``sharded_only``: fsdp over several ranks) a one-file step, is refused
        in one line. Then rank 0 takes the folder's lease. Collective over the group's ranks."""
        self.fingerprint = fingerprint
        if group_world_size() > 1:
            import torch.distributed as dist

            self._pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=CHECKPOINT_TIMEOUT_S))
        newest = self.store.latest(self.group) if self.leader else None
        step = rank0_decides(newest.step if newest is not None else 0, self.device)
        if not self.leader:
            newest = self.store.at(step, self.group, verify=False) if step else None
        if newest is not None:
            self._check_model(newest, model)
            if sharded_only and GLOBAL_PART not in newest.sharded:
                raise UserError(
                    f"the checkpoint at {self.store.step_dir(step)} was written by one-rank groups (one file): an "
                    "fsdp group of several ranks resumes only from a sharded one; resume it once with --parallel ddp "
                    "(its checkpoints are sharded from then on) or pass a new --checkpoint-dir"
                )
        if self.lease is not None:  # every check passed: this run holds the folder from now on
            self.lease.acquire(self.take_over)
            self.lease.start()
            self._forget_sigterm = on_sigterm(self.lease.release)  # scancel, Ctrl-C, preemption: free at once
        self.resume_from = newest
        return newest

    def _check_model(self, ckpt: Checkpoint, model: nn.Module) -> None:
        saved = ckpt.global_state.get("model_fingerprint")
        if saved is not None:
            differs = fingerprint_mismatch(saved, self.fingerprint)
        else:  # written before fingerprints: a preset's config
            legacy, to_dict = (
                ckpt.global_state.get("model_config"),
                getattr(getattr(model, "cfg", None), "to_dict", None),
            )
            mine = to_dict() if to_dict is not None else None
            differs = None if legacy is None or legacy == mine else f"{legacy} there, {mine} here"
        if differs is not None:
            raise UserError(
                f"the checkpoint at {self.store.step_dir(ckpt.step)} is for a different model ({differs}): "
                "pass the same --model, --model-args and --seq-len, or a new --checkpoint-dir"
            )

    def load(self, state: TrainState) -> bool:
        """Restore the step :meth:`open` chose; False when there is none (a fresh run)."""
        ckpt = self.resume_from
        if ckpt is None:
            return False
        self._load_global(ckpt, state, newer=False)
        values, progress = ckpt.group_state, state.progress
        if values is None:
            logger.warning(
                "checkpoint step %d has no part for group %d: its inner optimizer starts afresh", ckpt.step, self.group
            )
        elif group_part(self.group) in ckpt.sharded:
            url, rank = self.store.sharded_url(ckpt.step, group_part(self.group)), group_rank()
            own = state.outer.rank_state(template=True)  # loaded in place, where the part holds it at that size
            shards = _dcp().group_state_dict(
                state.model,
                state.inner_optimizer,
                rank,
                bool(values.get("local_weights")),
                _dcp().saved_sizes(url),
                own,
            )
            self.store.load_sharded_part(ckpt.step, group_part(self.group), shards, self._pg)
            _dcp().load_group_state_dict(state.model, state.inner_optimizer, shards)
            state.outer.load_rank_state(shards.get(_dcp().rank_state_key(rank), {}))
        else:
            state.inner_optimizer.load_state_dict(values["inner_optimizer"])
            local = values.get("local_weights")
            if local is not None:  # streaming or mixing: the model was not at the global weights then
                with torch.no_grad():
                    for name, p in state.model.named_parameters():
                        if name in local:
                            p.copy_(local[name])
            torch.set_rng_state(values["rng"])
            state.outer.load_rank_state(values.get("rank_state", {}))
        if values is not None:
            progress.position, progress.inner_steps = values["data_position"], values["inner_steps"]
        if self.leader:
            logger.info(
                "group %d resumed from %s (outer step %d)", self.group, self.store.step_dir(ckpt.step), ckpt.step
            )
        return True

    def _load_global(self, ckpt: Checkpoint, state: TrainState, newer: bool) -> None:
        """The manager's and the outer loop's state of ``ckpt``: from one file, or every rank its shards."""
        state.manager.load_state_dict(ckpt.global_state["manager"])
        if GLOBAL_PART in ckpt.sharded:
            target = _dcp().global_state_dict(state.outer, state.model)
            self.store.load_sharded_part(ckpt.step, GLOBAL_PART, target, self._pg)
            _dcp().load_global_state_dict(state.outer, state.model, target, newer=newer)
        elif newer:
            state.outer.adopt_newer_global_state(ckpt.global_state["diloco"])
        else:
            state.outer.load_state_dict(ckpt.global_state["diloco"])

    # --- around a sync -----------------------------------------------------------------------------------
    def before_sync(self) -> None:
        """The writer may be reading the global state the coming sync rewrites: wait for it. A group part that
        never comes (its group died or did not commit) must not hold this loop back meanwhile: peers behind
        would form a quorum of their own and commit the same step differently; so the global writer publishes
        without it now."""
        self.publish_now.set()
        self.writer.wait()
        self.publish_now.clear()
        if self.lease is not None:
            self.lease.check_held()  # another run took the folder over: stop before writing there again

    def catch_up(self, state: TrainState, num_groups: int) -> bool:
        """A group left behind (frozen, or back after its peers moved on or even finished) must not train on
        alone from stale weights and overwrite their checkpoints: if storage holds a newer step, adopt it.
        True when it did. Collective over the group's ranks (rank 0 looks, the others follow)."""
        if num_groups == 1 or not state.outer.adopts_from_storage:
            return False
        current = state.manager.current_step()
        ckpt, adopt = None, 0
        if self.leader and self.store.newest_published_step(self.run) > current:  # this run's steps only
            ckpt = self.store.latest(self.group, self.run)
            if ckpt is not None and ckpt.step > current:
                adopt = ckpt.step
        adopt = rank0_decides(adopt, self.device)
        if adopt == 0:
            return False
        at = ckpt if ckpt is not None else self.store.at(adopt, self.group, verify=False)
        if self.leader:
            logger.warning(
                "group %d is at outer step %d but its peers published step %d: adopting it", self.group, current, adopt
            )
        self._load_global(at, state, newer=True)
        return True

    # --- after a commit ----------------------------------------------------------------------------------
    def due(self, step: int, last_step: int) -> bool:
        """Whether committed outer step ``step`` gets a checkpoint (every ``--checkpoint-every``, and the last)."""
        return step % self.every == 0 or step == last_step

    def save(self, step: int, state: TrainState, record: Dict[str, Any]) -> None:
        """Queue step ``step``'s durable state and then its metrics ``record`` (written even when storage fails,
        then without ``checkpoint``). The global part only if this group is the quorum's first."""
        manager, outer, progress, run = state.manager, state.outer, state.progress, self.run
        writes_global = bool(rank0_decides(int(manager.participating_rank() == 0), self.device))
        participants = manager.num_participants()
        global_values = {"outer_step": step, "model_fingerprint": self.fingerprint, "manager": manager.state_dict()}
        group_values: Dict[str, Any] = {"data_position": progress.position, "inner_steps": progress.inner_steps}
        local_weights = outer.local_differs_from_global  # a resume must restore the local weights too
        write_group: Callable[[], None]
        write_global: Callable[[], None]
        if self._pg is not None:  # every rank its shards
            global_shards = _dcp().global_state_dict(outer, state.model)  # references: waited for before a sync
            shards = to_cpu(
                _dcp().group_state_dict(
                    state.model, state.inner_optimizer, group_rank(), local_weights, rank_state=outer.rank_state()
                )
            )
            group_values["local_weights"] = local_weights
            pg, part = self._pg, group_part(self.group)
            write_group = lambda: self.store.write_sharded_part(step, part, shards, group_values, pg, run)  # noqa: E731
            write_global = lambda: self.store.write_sharded_part(  # noqa: E731
                step, GLOBAL_PART, global_shards, global_values, pg, run
            )
        else:
            global_values["diloco"] = outer.state_dict()  # references: waited for before the next sync
            group_values.update(inner_optimizer=to_cpu(state.inner_optimizer.state_dict()), rng=torch.get_rng_state())
            if local_weights:
                group_values["local_weights"] = to_cpu(dict(state.model.named_parameters()))
            if outer.rank_state():  # error feedback's residuals, eager starts: the rank's own, like its local weights
                group_values["rank_state"] = to_cpu(outer.rank_state())
            write_group = lambda: self.store.write_part(step, group_part(self.group), group_values, run)  # noqa: E731
            write_global = lambda: self.store.write_part(step, GLOBAL_PART, global_values, run)  # noqa: E731
        weights = outer.global_weights()
        record = {**record, "group": self.group, "time": time.time()}

        def job() -> None:
            try:
                started = time.perf_counter()
                write_group()
                if writes_global:
                    if self.leader:  # the group's other ranks wait for it inside the next write's barrier
                        patience = part_patience(time.perf_counter() - started)
                        self.store.wait_for_group_parts(step, participants, patience, stop=self.publish_now)
                    write_global()
                    if self.leader:
                        self.store.prune()
                record["checkpoint"] = self.store.step_dir(step)
            finally:
                self._write_record(record, weights)

        self.writer.submit(job, f"checkpoint of outer step {step}")

    def log(self, record: Dict[str, Any], weights: Optional[Any] = None) -> None:
        """Queue a metrics ``record`` (``weights``: the global weights it was committed with, for its checksum)."""
        record = {**record, "group": self.group, "time": time.time()}
        self.writer.submit(lambda: self._write_record(record, weights), f"metrics of outer step {record['outer_step']}")

    def _write_record(self, record: Dict[str, Any], weights: Optional[Any]) -> None:
        if not self.leader:
            return
        if weights is not None:
            record["weights_sha"] = weights_checksum(weights)
        self.metrics.write(record)

    def release(self) -> None:
        """The run is done with the folder (it ended, or was stopped): let the next run have it at once."""
        if self.lease is not None:
            self.lease.release()

    def close(self) -> None:
        """Wait for the writer; stop renewing the lease (a run that crashed leaves it to go stale, so that its
        restart, which holds the same run id, finds the folder still its own)."""
        self.writer.close()
        self.metrics.close()
        if self.lease is not None:
            self._forget_sigterm()
            self.lease.stop()
