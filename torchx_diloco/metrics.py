"""What a run reports: two DiLoCo lines per outer step, a progress bar on terminals, and JSON lines on disk.

The JSON lines (one file per group beside the checkpoints) carry a checksum of the global weights at every
committed outer step, so anyone can check afterwards that all groups agreed at every step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import fsspec
import torch
from tqdm import tqdm

from torchx_diloco.errors import UserError
from torchx_diloco.fragment import local_tensor

# JSON field -> TensorBoard tag, written for every committed outer step
TENSORBOARD_TAGS = {
    "loss": "loss/train",
    "eval_loss": "loss/eval",
    "tokens_per_s": "throughput/tokens_per_s",
    "sync_s": "sync/seconds",
    "participants": "sync/participants",
}


def weights_checksum(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over the raw bytes of ``tensors`` (bit-identical weights give equal checksums)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def print_outer_step(inner_steps: int, outer_step: int, loss: float) -> None:
    """The two lines torchft's DiLoCo example prints, which users and scripts look for."""
    tqdm.write(f"DiLoCo: Number of inner optimizer steps completed: {inner_steps}", file=sys.stdout)
    tqdm.write(f"DiLoCo: Number of outer optimizer steps completed: [{outer_step}] loss = {loss}", file=sys.stdout)
    sys.stdout.flush()


def progress_bar(total: int, initial: int, group_id: int) -> tqdm:
    """A bar of outer steps, shown only when stderr is a terminal."""
    return tqdm(
        total=total,
        initial=initial,
        desc=f"group {group_id}",
        unit="outer step",
        disable=not sys.stderr.isatty(),
        leave=False,
    )


class TensorBoardLog:
    """The numbers of each committed outer step as TensorBoard scalars (:data:`TENSORBOARD_TAGS`), against the
    global inner step (outer step x H), in ``log_dir/replica_group_<g>``: TensorBoard shows each group as a run."""

    def __init__(self, log_dir: str, group: int, sync_every: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'torchx-diloco[tb]'") from None
        self.dir = os.path.join(log_dir, f"replica_group_{group}")
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"--tensorboard {log_dir}: cannot create {self.dir} ({e.strerror}): pass a writable directory"
            ) from None
        self.sync_every = sync_every
        self.writer = SummaryWriter(self.dir)

    def write(self, record: Dict[str, Any]) -> None:
        if not record.get("committed"):
            return
        step = record["outer_step"] * self.sync_every
        for key, tag in TENSORBOARD_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, float(record[key]), global_step=step, walltime=record.get("time"))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsLog:
    """A JSON-lines file on any fsspec URL: appended to where the filesystem can, rewritten elsewhere; each
    record also goes to ``tensorboard`` when given."""

    def __init__(self, url: str, tensorboard: Optional[TensorBoardLog] = None) -> None:
        self.tensorboard = tensorboard
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self._lines: List[str] = []
        self._append = "file" in self.fs.protocol or "local" in self.fs.protocol
        if self.fs.exists(self.path):  # a resumed run continues its file
            self._lines = self.fs.cat_file(self.path).decode().splitlines()

    def write(self, record: Dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True)
        self._lines.append(line)
        self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
        if self._append:
            with self.fs.open(self.path, "ab") as f:
                f.write((line + "\n").encode())
        else:
            self.fs.pipe_file(self.path, ("\n".join(self._lines) + "\n").encode())
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def state_bytes(model: torch.nn.Module, optimizers: Sequence[Any], backups: List[torch.Tensor]) -> Dict[str, int]:
    """Bytes of training state this rank holds (its own shards under FSDP): parameters, the global weights' backup,
    the optimizers' tensors by kind (``optimizers``: (name, optimizer) pairs, e.g. the outer momentum and the
    AdamW moments; benchmarks/bench_groups.py reads them)."""

    def size(tensors: Iterable[torch.Tensor]) -> int:
        return sum(local_tensor(t).numel() * t.element_size() for t in tensors)

    held: Dict[str, int] = {"params": size(model.parameters()), "backups": size(backups)}
    for name, optimizer in optimizers:
        held[name] = size(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return held


class Window:
    """The inner steps of one outer step, as its metrics record reports them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)  # summed on the device: no sync per inner step
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.steps += 1

    def mean_loss(self) -> torch.Tensor:
        return self.loss_sum / max(1, self.steps)

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def committed(
        self, outer_step: int, inner_steps: int, tokens_per_step: int, loss: float, seconds: float, **values: Any
    ) -> Dict[str, Any]:
        """The record of a committed outer step whose window took ``seconds``: ``values`` (eval loss, participants,
        the sync's numbers, the learning rates, the state's bytes) beside the window's own."""
        return {
            "outer_step": outer_step,
            "committed": True,
            "inner_steps": inner_steps,
            "window_steps": self.steps,  # this group's inner steps in this outer step (its H, or H/P with fragments)
            "tokens": inner_steps * tokens_per_step,  # this group's, since the run began
            "loss": loss,
            "tokens_per_s": self.steps * tokens_per_step / seconds,
            **values,
        }
