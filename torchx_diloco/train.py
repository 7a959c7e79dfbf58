"""``python -m torchx_diloco.train``: one replica group of a DiLoCo run, assembled from the package's parts.

Run it once per group (the TorchX components do, under torchrun) against one torchft lighthouse. The parts:
the model (:mod:`~torchx_diloco.modeling`), its data (:mod:`~torchx_diloco.data`), how the group's ranks share
it (:mod:`~torchx_diloco.parallel`), the outer loop (:class:`~torchx_diloco.DiLoCo`, or torchft's with
``--impl torchft``), joining the run (:mod:`~torchx_diloco.cluster`) and checkpointing
(:class:`~torchx_diloco.checkpoint.checkpointer.Checkpointer`); :class:`Trainer` is the loop between them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from torchx_diloco.checkpoint.checkpointer import Checkpointer, Progress, TrainState
from torchx_diloco.cluster import (
    check_lighthouse_serves_run,
    end_run_on_user_error,
    group_mean,
    group_rank,
    group_world_size,
    join_run,
    leave_group_process_group,
    pick_device,
)
from torchx_diloco.config import ERROR_FEEDBACK, TrainConfig, parse_config
from torchx_diloco.data import Corpus, eval_batches
from torchx_diloco.diloco import DiLoCo
from torchx_diloco.errors import UserError
from torchx_diloco.fragment import weights_swapped_in
from torchx_diloco.lease import run_identity
from torchx_diloco.metrics import TensorBoardLog, Window, print_outer_step, progress_bar, state_bytes
from torchx_diloco.modeling import build_model, check_against_data, data_vocab_size, fingerprint, forward_loss
from torchx_diloco.outer_loop import OuterLoop
from torchx_diloco.parallel import parallelize, reshard
from torchx_diloco.torchft_diloco import TorchftDiLoCo

logger = logging.getLogger(__name__)


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


class Trainer:
    """One replica group: its model, optimizers, data and durable state; ``run()`` trains to the end."""

    cfg: TrainConfig
    device: torch.device
    model: nn.Module  # the module the optimizers hold
    forward_model: Callable[..., Any]  # what a batch goes through: the model, its DDP wrapper, or either compiled
    inner_opt: torch.optim.Optimizer
    outer_opt: torch.optim.Optimizer
    progress: Progress  # batches drawn from the group's shard, inner steps taken
    checkpointer: Checkpointer
    manager: Any  # torchft's Manager, set by join()
    diloco: OuterLoop  # ours or torchft's (--impl), set by join()
    state: TrainState  # what checkpoints save, set by join()

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, data = cfg, cfg.data
        self.group = cfg.cluster.group_id
        self.device = pick_device(cfg.device)
        tensorboard = None
        if cfg.tensorboard and group_rank() == 0:
            tensorboard = TensorBoardLog(cfg.tensorboard, self.group, cfg.steps_per_outer_step)
        run = run_identity(cfg.cluster.run_id, cfg.cluster.lighthouse)
        self.checkpointer = Checkpointer(cfg.checkpoint, self.group, run, self.device, tensorboard)

        corpus = Corpus.load(data.path, data.seq_len, data.eval_path)
        # each rank its own part of the group's shard: G ranks train on G times the tokens, none twice
        self.shard = corpus.shard(self.group, cfg.cluster.num_groups, data.seq_len, group_rank(), group_world_size())
        self.eval_tokens = corpus.eval
        self.data_seed = cfg.seed * 7919 + self.group

        torch.manual_seed(cfg.seed)  # the same initial weights in every group (join() makes sure of it)
        self.model = build_model(cfg.model.spec, cfg.model.args, data.seq_len).to(self.device)
        check_against_data(self.model, cfg.model.spec, data_vocab_size(corpus), data.seq_len, self.device)
        if cfg.diloco.impl == "torchft" and group_world_size() > 1:
            raise UserError("--impl torchft runs groups of one rank here: use --impl torchx_diloco for several ranks")
        self.parallel = parallelize(self.model, cfg.cluster.parallel, self.device, cfg.cluster.collective_timeout)
        # --compile wraps the module: same parameters, so the optimizers and DiLoCo keep the originals
        self.forward_model = torch.compile(self.parallel.module) if cfg.model.compile else self.parallel.module
        o = cfg.optim
        self.inner_opt, self.outer_opt = build_optimizers(
            self.model, o.inner_lr, o.outer_lr, o.outer_momentum, o.weight_decay
        )
        self.progress = Progress()
        # the tokens one inner step of this group trains on: its weight in DiLoCo's average, its records' tokens
        self.tokens_per_step = data.grad_accum * data.batch_size * data.seq_len * group_world_size()
        fsdp_ranks = cfg.cluster.parallel == "fsdp" and group_world_size() > 1
        self.checkpointer.open(self.model, fingerprint(self.model, cfg.model.spec, cfg.model.args), fsdp_ranks)

    def join(self) -> None:
        """Join the run (lighthouse, Manager, the other groups), build the outer loop, resume or agree."""
        cfg, d = self.cfg, self.cfg.diloco
        self.manager = join_run(cfg.cluster, self.device)
        parts = (self.manager, self.model, self.inner_opt, self.outer_opt, d.sync_every, d.fragments, d.overlap_steps)
        self.diloco = (
            DiLoCo(
                *parts,
                mix_alpha=d.mix_alpha,
                codec=d.codec,
                topk_density=d.topk_density,
                error_feedback=ERROR_FEEDBACK[d.error_feedback],
                outer_delay=d.outer_delay,
                tokens_per_step=self.tokens_per_step,
                group=cfg.cluster.group_id,
                groups=cfg.cluster.num_groups,
                quorum_retry_s=cfg.cluster.lighthouse_timeout,
                split_group=self.parallel.split_group,
            )
            if d.impl == "torchx_diloco"
            else TorchftDiLoCo(*parts, mix_alpha=d.mix_alpha)
        )
        self.state = TrainState(self.model, self.inner_opt, self.manager, self.diloco, self.progress)
        if not self.checkpointer.load(self.state) and cfg.cluster.num_groups > 1:
            # a fresh run: the groups start from one set of weights even if the factory made them differ
            self.diloco.agree_initial_weights()

    def run(self) -> int:
        try:
            return self._run()
        except KeyboardInterrupt:  # stopped by hand: the next run may have the folder at once
            self.checkpointer.release()
            raise

    def _run(self) -> int:
        cfg = self.cfg
        with contextlib.ExitStack() as cleanup:  # whatever happens, the threads and the Manager end
            cleanup.callback(self.checkpointer.close)
            self.join()
            cleanup.callback(self.manager.shutdown, wait=False)
            cleanup.callback(self.diloco.close)
            bar = cleanup.enter_context(progress_bar(cfg.outer_steps, self.manager.current_step(), self.group))
            window = Window(self.device)
            # with eager outer steps the last round, sent at the end of step N-1's window, is waited for below
            last = cfg.outer_steps - self.diloco.schedule.outer_delay
            lr = cfg.optim.inner_lr
            while self.manager.current_step() < last:
                upcoming = self.diloco.upcoming()
                lr = inner_lr(upcoming.inner_step, cfg.optim.inner_lr, cfg.total_inner_steps, cfg.optim.warmup_steps)
                for group in self.inner_opt.param_groups:
                    group["lr"] = lr
                loss = self._accumulate_gradients()
                if cfg.optim.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
                if upcoming.changes_global:
                    self._before_sync(upcoming.starts_quorum)
                    if self.manager.current_step() >= cfg.outer_steps:
                        break  # the peers finished the run without us
                self.inner_opt.step()  # (torchft's implementation syncs inside this call)
                self.inner_opt.zero_grad(set_to_none=True)
                self.progress.inner_steps += 1
                window.add(loss)
                committed = self.diloco.step()
                if upcoming.ends_window:
                    self._end_window(window, committed, lr)
                    bar.update(int(committed))
                    if self.manager.current_step() < last:  # (else the last round's record reports this window)
                        window.reset()
            if self.manager.current_step() < cfg.outer_steps:  # eager outer steps: the last round lands
                self._before_sync(starts_quorum=False)
                committed = self.diloco.sync()
                self._end_window(window, committed, lr)
                bar.update(int(committed))
            logger.info("group %d rank %d holds training state of %s bytes", self.group, group_rank(), self._held())
            self.checkpointer.writer.wait()
            self.checkpointer.release()  # the run is done with the folder: the next run may have it at once
        if group_rank() == 0:
            print(f"DiLoCo: group {self.group} finished at outer step {self.manager.current_step()}", flush=True)
        return 0

    def _before_sync(self, starts_quorum: bool) -> None:
        """Just before the global state changes: the writer must be done reading it; before a quorum, the
        lighthouse must still serve this run and a group left behind catches up with storage."""
        self.checkpointer.before_sync()
        if not starts_quorum:
            return
        check_lighthouse_serves_run(self.cfg.cluster.lighthouse, self.cfg.cluster.run_id)
        if self.checkpointer.catch_up(self.state, self.cfg.cluster.num_groups):
            # this step's gradient was computed on the weights just replaced: keep it out of AdamW's moments
            self.inner_opt.zero_grad(set_to_none=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """--dtype bf16: the forward and the loss under autocast; the weights and gradients stay fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.model.dtype == "bf16")

    def _accumulate_gradients(self) -> torch.Tensor:
        """One inner step's gradients: --grad-accum micro-batches of --batch-size, each loss scaled by 1/K (the
        data position advances K batches). Returns the mean loss over the micro-batches."""
        data, k = self.cfg.data, self.cfg.data.grad_accum
        total = torch.zeros((), device=self.device)
        for i in range(k):
            x, y = self.shard.batch(self.progress.position, data.batch_size, data.seq_len, self.data_seed)
            self.progress.position += 1
            # DDP in a group of several ranks: all-reduce the gradients once, after the last micro-batch
            no_sync = getattr(self.parallel.module, "no_sync", None)
            with no_sync() if no_sync is not None and i < k - 1 else contextlib.nullcontext():
                with self._autocast():
                    loss = forward_loss(self.forward_model, x.to(self.device), y.to(self.device))
                (loss / k).backward()
            total += loss.detach().float()
        return total / k

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """The held-out loss of the global weights (with fragments or --mix-alpha the model holds other, local
        weights after a commit: the global ones are swapped in for the evaluation)."""
        data = self.cfg.data
        if data.eval_batches == 0:
            return None
        self.model.eval()
        params = [p for _, p, _ in self.diloco.global_tensors()]
        differ = self.diloco.local_differs_from_global
        with weights_swapped_in(params, self.diloco.global_weights()) if differ else contextlib.nullcontext():
            with self._autocast():
                losses = [
                    forward_loss(self.model, x.to(self.device), y.to(self.device)).float().item()
                    for x, y in eval_batches(self.eval_tokens, data.batch_size, data.seq_len, data.eval_batches)
                ]
            reshard(self.model)
        self.model.train()
        return sum(losses) / len(losses)

    def _end_window(self, window: Window, committed: bool, lr: float) -> None:
        """The outer step was applied: its metrics record, and its checkpoint when one is due."""
        cfg, step, sync = self.cfg, self.manager.current_step(), self.diloco.last_sync
        if "fragment" not in sync:  # no round was in flight (the first window with --outer-delay 1)
            return
        if not committed:
            self.checkpointer.log({"outer_step": step + 1, "committed": False, "sync_s": sync.get("sync_s", 0.0)})
            return
        seconds = window.seconds()
        loss = group_mean(window.mean_loss())  # the group's: each rank trained on its own part of the shard
        record = window.committed(
            step,
            self.progress.inner_steps,
            self.tokens_per_step,
            loss,
            seconds,
            eval_loss=self.evaluate(),
            participants=self.manager.num_participants(),
            **sync,  # fragment, sent_bytes, sync_s (the time the outer loop held training up for this sync)
            inner_lr=lr,
            outer_lr=cfg.optim.outer_lr,
            state_bytes=self._held(),
        )
        if group_rank() == 0:
            print_outer_step(self.progress.inner_steps, step, loss)
        if self.checkpointer.due(step, cfg.outer_steps):
            self.checkpointer.save(step, self.state, record)
        else:
            self.checkpointer.log(record, self.diloco.global_weights())

    def _held(self) -> Dict[str, int]:
        optimizers = [("outer_momentum", self.outer_opt), ("adamw_moments", self.inner_opt)]
        return state_bytes(self.model, optimizers, self.diloco.global_weights())


def keep_freed_memory() -> None:
    """glibc: keep freed host memory for reuse instead of trimming it back to the kernel. With glibc's dynamic
    thresholds the gradients ``zero_grad(set_to_none=True)`` frees can sit at the heap's top (depending on where
    the first outer step's buffers landed), and every backward page-faults them in afresh: ~10k faults and +10%
    CPU per inner step for the 10.7M GPT (docs/benchmarks.md). Variables the user set win; a process's memory no
    longer shrinks after its peak. Nothing to do off glibc (CUDA tensors have PyTorch's own allocator)."""
    import ctypes
    import os

    if sys.platform != "linux" or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)


def main(argv: Optional[List[str]] = None) -> int:
    """The trainer's entry point. Bad input: its line on stderr and in the error files TorchX reads (see
    cluster.end_run_on_user_error), exit 2. A crash: the exception in this worker's error file, which torchrun
    hands to TorchX once no restart is left (torchelastic's ``record`` convention), then the traceback."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    from torchx_diloco.errors import report_error
    from torchx_diloco.logs import configure_logging

    configure_logging()
    keep_freed_memory()
    try:
        cfg = parse_config(argv)
        code = Trainer(cfg).run()
        leave_group_process_group()  # (after an error the process exits without: a peer may be gone)
        return code
    except UserError as e:
        report_error("torchx_diloco.train", str(e), e.exit_code)
        end_run_on_user_error(str(e), e.exit_code)
        return e.exit_code
    except Exception as e:
        get_error_handler().record_exception(e)
        raise


if __name__ == "__main__":
    sys.exit(main())
