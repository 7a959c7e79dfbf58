"""Fragments: the parameters that sync together, their global weights (the backup) and their outer optimizer.

Streaming DiLoCo cuts the model into P fragments, in module order, of about equal size (:func:`split_evenly`);
plain DiLoCo is one fragment. A fragment holds this rank's share of its parameters (a shard under FSDP2) and
knows the three things an outer step needs: its pseudo-gradient ``global - local``, the outer step itself, and
going back to its global weights. With error feedback it also keeps this rank's residual: what its codec has not
sent yet of the fragment's pseudo-gradients. With eager outer steps (``outer_delay=1``) its inner phases start
from an eager point of their own (``start``) instead of the global weights, and its outer step lands on the global
weights while the local ones train on.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local shard of an FSDP2 (DTensor) parameter, else the parameter."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def param_ids(optimizer: torch.optim.Optimizer) -> set:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


@contextlib.contextmanager
def grads_set_aside(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Parameters without gradients for a moment: torch's optimizer state-dict helpers initialise an optimizer
    that has no state yet (so a checkpoint has somewhere to load into) only when no parameter has a gradient."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g


@contextlib.contextmanager
@torch.no_grad()
def weights_swapped_in(params: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """``params`` (this rank's shards) hold ``weights`` inside the block, their own values again after it."""
    saved = [local_tensor(p).detach().clone() for p in params]
    for p, w in zip(params, weights, strict=True):
        local_tensor(p).copy_(w)
    try:
        yield
    finally:
        for p, s in zip(params, saved, strict=True):
            local_tensor(p).copy_(s)


@contextlib.contextmanager
def optimizer_state_set_aside(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside the block ``optimizer`` steps on copies of its state; after it, its state is the same objects with
    the same values as before (a state dict taken earlier, and being read by another thread, never changes)."""
    saved = dict(optimizer.state)
    for p, entry in saved.items():
        optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in entry.items()}
    try:
        yield
    finally:
        optimizer.state.clear()
        optimizer.state.update(saved)


def split_evenly(sizes: Sequence[int], parts: int) -> List[range]:
    """``parts`` contiguous ranges over tensors of ``sizes`` whose totals are as equal as whole tensors allow."""
    if parts > len(sizes):
        raise ValueError(f"fragments={parts} exceeds the model's {len(sizes)} trainable parameter tensors")
    cumulative = list(itertools.accumulate(sizes))
    total, cuts = cumulative[-1], [0]
    for k in range(1, parts):
        lo, hi = cuts[-1] + 1, len(sizes) - (parts - k)  # leave at least one tensor to each later part
        cuts.append(min(range(lo, hi + 1), key=lambda c: abs(cumulative[c - 1] - k * total / parts)))
    cuts.append(len(sizes))
    return [range(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


class Fragment:
    """Parameters that sync together: their global weights (the backup, as of this fragment's last commit)
    and the outer optimizer that steps them."""

    def __init__(
        self,
        index: int,
        names: List[str],
        params: List[nn.Parameter],
        outer_optimizer: torch.optim.Optimizer,
        backup_device: torch.device | str,
    ) -> None:
        self.index, self.names, self.params, self.outer_optimizer = index, names, params, outer_optimizer
        self.numel = sum(t.numel() for t in self.locals())  # this rank's share (a shard under FSDP)
        self._backup_device = torch.device(backup_device)
        self._pin = self._backup_device.type == "cpu" and torch.cuda.is_available()
        self.backup = [
            torch.empty(t.shape, dtype=t.dtype, device=backup_device, pin_memory=self._pin) for t in self.locals()
        ]
        self.save_backup()
        # error feedback: the part of this rank's pseudo-gradients its codec has not sent yet (None: no feedback)
        self.residual: Optional[torch.Tensor] = None
        self.inner_steps = 0  # inner steps since this fragment was last sent: its work in the next average
        # eager outer steps: where this inner phase started, flat fp32 (None: at the global weights, the backup)
        self.start: Optional[torch.Tensor] = None

    def zero_residual(self, numel: Optional[int] = None) -> None:
        """Start error feedback afresh: a residual of zeros (``numel`` values: this rank's share of the payload; by
        default the current residual's size, and nothing without one), on the backup device."""
        numel = numel if numel is not None else self.residual.numel() if self.residual is not None else None
        if numel is not None:
            self.residual = torch.zeros(numel, dtype=torch.float32, device=self._backup_device, pin_memory=self._pin)

    def locals(self) -> List[torch.Tensor]:
        return [local_tensor(p) for p in self.params]

    @torch.no_grad()
    def save_backup(self) -> None:
        for t, backup in zip(self.locals(), self.backup, strict=True):
            backup.copy_(t.detach())  # blocking: a checkpoint writer may read the backup next

    @torch.no_grad()
    def restore_backup(self) -> None:
        for t, backup in zip(self.locals(), self.backup, strict=True):
            t.copy_(backup, non_blocking=False)
        if self.start is not None:  # the next inner phase starts at the global weights
            self.start.copy_(torch.cat([b.reshape(-1).float() for b in self.backup]))

    def start_eagerly(self) -> None:
        """Inner phases start from a point of their own from now on (:meth:`eager_restart`), kept on the backup
        device: the global weights until the first restart."""
        self.start = torch.zeros(self.numel, dtype=torch.float32, device=self._backup_device, pin_memory=self._pin)
        self.start.copy_(torch.cat([b.reshape(-1).float() for b in self.backup]))

    @torch.no_grad()
    def pseudo_gradient(self) -> torch.Tensor:
        """``start - local`` of every parameter (this rank's shards), flat, in fp32: the inner phase's progress
        from where it started, the global weights unless it started eagerly."""
        device = self.params[0].device
        flat = torch.empty(self.numel, dtype=torch.float32, device=device)
        starts = self.backup if self.start is None else self._split(self.start.to(device, non_blocking=True))
        offset = 0
        for t, start in zip(self.locals(), starts, strict=True):
            n = t.numel()
            torch.sub(start.to(device, non_blocking=True).view(-1), t.reshape(-1), out=flat[offset : offset + n])
            offset += n
        return flat

    def _split(self, flat: torch.Tensor) -> List[torch.Tensor]:
        return list(flat.split([t.numel() for t in self.locals()]))

    @torch.no_grad()
    def eager_restart(self, own: Optional[torch.Tensor]) -> None:
        """Eager outer steps: while the average of the round just sent is on its way, the next inner phase starts
        where the outer step will about land, the outer optimizer's step from the global weights with this group's
        own pseudo-gradient ``own`` standing in for the average (on a copy of the optimizer's state: the global
        state is untouched). ``own`` None (a group that just healed): at the global weights.

        Untouched means the very tensors too: torchft serves a healing peer the state dict it took at the quorum,
        which references the optimizer's state tensors, until the next commit; stepping them in place here would
        hand that peer a momentum no group holds."""
        assert self.start is not None, "start_eagerly() first"
        if own is None:
            self.restore_backup()
            return
        with weights_swapped_in(self.params, self.backup), optimizer_state_set_aside(self.outer_optimizer):
            self._set_grads(own.to(self.params[0].device))
            self.outer_optimizer.step()
            self.outer_optimizer.zero_grad(set_to_none=True)
            self.start.copy_(torch.cat([t.detach().reshape(-1).float().to(self.start.device) for t in self.locals()]))
        for t, piece in zip(self.locals(), self._split(self.start), strict=True):
            t.copy_(piece.view_as(t).to(t.device, t.dtype))

    def _set_grads(self, flat: torch.Tensor) -> None:
        """Each parameter's gradient, cut from ``flat`` (this rank's shards, as DTensors under FSDP2)."""
        from torch.distributed.tensor import DTensor

        offset = 0
        for p, t in zip(self.params, self.locals(), strict=True):
            n = t.numel()
            grad = flat[offset : offset + n].view_as(t).to(t.dtype)
            if isinstance(p, DTensor):  # FSDP2: the shard's gradient, as the DTensor the optimizer expects
                grad = DTensor.from_local(grad, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            p.grad = grad
            offset += n

    @torch.no_grad()
    def outer_step_aside(self, average: torch.Tensor) -> None:
        """The outer step on the global weights, the local weights training on untouched (eager outer steps)."""
        with weights_swapped_in(self.params, self.backup):
            self.outer_step(average)

    @torch.no_grad()
    def outer_step(self, average: torch.Tensor) -> None:
        self._set_grads(average)
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self.save_backup()


OuterOptimizers = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]]


def build_fragments(
    named: List[Tuple[str, nn.Parameter]],
    fragments: Union[int, Sequence[nn.Module]],
    outer_optimizer: OuterOptimizers,
    backup_device: torch.device | str,
) -> List[Fragment]:
    """The fragments of the trainable parameters ``named``: ``fragments`` P about equal contiguous parts, or one
    per module given; each stepped by the one outer optimizer, or by its own when a list of them is given."""
    if isinstance(fragments, int):
        parts: Sequence[Sequence[int]] = split_evenly([p.numel() for _, p in named], fragments)
    else:
        index = {id(p): i for i, (_, p) in enumerate(named)}
        parts = [[index.get(id(p), -1) for p in m.parameters() if p.requires_grad] for m in fragments]
        flat = sorted(i for part in parts for i in part)
        if flat != list(range(len(named))) or any(not part for part in parts):
            raise ValueError("fragments must hold every trainable parameter of the model exactly once")
    if isinstance(outer_optimizer, torch.optim.Optimizer):
        if param_ids(outer_optimizer) != {id(p) for _, p in named}:
            raise ValueError("outer_optimizer must optimise exactly the model's trainable parameters")
        outers, separate = [outer_optimizer] * len(parts), False
    else:  # one outer optimizer per fragment
        outers, separate = list(outer_optimizer), True
        if len(outers) != len(parts):
            raise ValueError(f"{len(outers)} outer optimizers for {len(parts)} fragments: pass one per fragment")
    built = []
    for i, (part, outer) in enumerate(zip(parts, outers, strict=True)):
        fragment = Fragment(i, [named[j][0] for j in part], [named[j][1] for j in part], outer, backup_device)
        if separate and param_ids(outer) != {id(p) for p in fragment.params}:
            raise ValueError(f"outer optimizer {i} must optimise exactly fragment {i}'s parameters")
        built.append(fragment)
    return built


def residuals_of(fragments: Sequence[Fragment]) -> Dict[str, torch.Tensor]:
    """The fragments' error-feedback residuals by name (``fragment_0``, ...): those that have one."""
    return {f"fragment_{f.index}": f.residual for f in fragments if f.residual is not None}


def load_residuals(fragments: Sequence[Fragment], saved: Mapping[str, torch.Tensor]) -> None:
    """Restore :func:`residuals_of` from a checkpoint; one that is missing or of another size (another layout of
    the group's ranks) starts from zeros, with one warning."""
    afresh = []
    for key, residual in residuals_of(fragments).items():
        value = saved.get(key)
        if value is None or value.shape != residual.shape:
            afresh.append(key)
            fragments[int(key.rsplit("_", 1)[1])].zero_residual()
        elif value.data_ptr() != residual.data_ptr():
            residual.copy_(value)
    if afresh:
        logger.warning("error feedback starts from zero residuals for %s: the checkpoint holds none", afresh)
