"""DiLoCo's outer loop on a torchft ``Manager``: the part of training that crosses replica groups.

Every ``sync_every`` inner steps each group sends its pseudo-gradient ``global - local``; the average over the
groups that contributed becomes the gradient of an outer optimizer step (SGD with Nesterov momentum in the
paper) taken from the last global weights. Between syncs the groups never talk, which is the point.

Differences from ``torchft.local_sgd.DiLoCo`` (which gives the same weights when nothing fails):
- one flat all-reduce per sync instead of one per parameter;
- a group that healed from a peer at this sync contributes nothing (its own weights are stale, so its
  ``global - local`` is noise) and the average is over the groups that did contribute;
- healing also resets the model to the global weights, not only the backup.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List

import torch
import torch.nn as nn
from torch.distributed import ReduceOp

logger = logging.getLogger(__name__)

STATE_KEY = "torchx_diloco"  # the name our global state is registered under with the manager


def _param_ids(optimizer: torch.optim.Optimizer) -> set:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


class DiLoCo:
    """Counts inner steps; every ``sync_every``-th call to :meth:`step` averages pseudo-gradients and steps.

    Args:
        manager: a torchft ``Manager`` built with ``use_async_quorum=False`` (a group that heals must hold the
            global weights before it computes its pseudo-gradient).
        model: the module the inner optimizer trains.
        inner_optimizer: steps every batch (AdamW in the paper); only used here to check its parameters.
        outer_optimizer: steps on the averaged pseudo-gradient (SGD, lr 0.7, momentum 0.9, Nesterov).
        sync_every: H, inner steps between syncs.
        backup_device: where the global weights are kept between syncs (host memory by default).
        quorum_retry_s: how long a sync keeps retrying the quorum while the lighthouse is unreachable.
    """

    def __init__(
        self,
        manager: Any,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        sync_every: int,
        backup_device: torch.device | str = "cpu",
        quorum_retry_s: float = 60.0,
    ) -> None:
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
        if getattr(manager, "_use_async_quorum", False):
            raise ValueError("DiLoCo needs a Manager built with use_async_quorum=False")
        self._params: List[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("the model has no trainable parameters")
        model_ids = {id(p) for p in self._params}
        for name, opt in (("inner_optimizer", inner_optimizer), ("outer_optimizer", outer_optimizer)):
            if _param_ids(opt) != model_ids:
                raise ValueError(f"{name} must optimise exactly the model's trainable parameters")
        if inner_optimizer is outer_optimizer:
            raise ValueError("inner_optimizer and outer_optimizer must be different optimizers")

        self.manager = manager
        self.model = model
        self.outer_optimizer = outer_optimizer
        self.sync_every = sync_every
        self.quorum_retry_s = quorum_retry_s
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        pin = torch.device(backup_device).type == "cpu" and torch.cuda.is_available()
        self._backup = [torch.empty(p.shape, dtype=p.dtype, device=backup_device, pin_memory=pin) for p in self._params]
        self._save_backup()
        self._healed = False
        self._step_at_sync = manager.current_step()
        self.local_step = 0  # inner steps since the last sync
        manager.register_state_dict_fn(STATE_KEY, self._load_healed_state, self.state_dict)

    # --- the global state: what a healing peer receives and what durable checkpoints hold ---------------
    def state_dict(self) -> Dict[str, Any]:
        """The global weights and the outer optimizer's state (the same in every group after a commit)."""
        return {
            "global_weights": dict(zip(self._names, self._backup, strict=True)),
            "outer_optimizer": self.outer_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Adopt ``state`` as the global state and reset the model to those weights."""
        weights = state["global_weights"]
        missing = set(self._names) ^ set(weights)
        if missing:
            raise ValueError(f"global weights do not match the model: differing names {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, backup in zip(self._names, self._backup, strict=True):
                if weights[name].shape != backup.shape:
                    raise ValueError(
                        f"global weight {name} has shape {tuple(weights[name].shape)}, "
                        f"the model has {tuple(backup.shape)}"
                    )
                backup.copy_(weights[name])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self._restore_backup()

    def _load_healed_state(self, state: Dict[str, Any]) -> None:
        """A peer's global state, received during the quorum of a sync (torchft sets the step first)."""
        if self.manager.current_step() == self._step_at_sync:
            # Same step (torchft re-syncs everyone at step 0): our inner steps started from these very
            # weights, so they still count; adopt the peer's copy of the global state and keep them.
            local = [p.detach().clone() for p in self._params]
            self.load_state_dict(state)
            with torch.no_grad():
                for p, mine in zip(self._params, local, strict=True):
                    p.copy_(mine)
            return
        self.adopt_newer_global_state(state)
        logger.info("healed from a peer: now at outer step %d", self.manager.current_step())

    def adopt_newer_global_state(self, state: Dict[str, Any]) -> None:
        """Take global weights newer than our local progress (from a peer or from storage).

        The model is reset to them, and this group contributes nothing to the next sync: its inner steps
        started from weights the others have moved past.
        """
        self.load_state_dict(state)
        self._healed = True

    def global_weights(self) -> List[torch.Tensor]:
        return list(self._backup)

    # --- the loop --------------------------------------------------------------------------------------
    @property
    def sync_due(self) -> bool:
        """True when the next :meth:`step` syncs: the moment to finish anything that reads the global state."""
        return self.local_step + 1 >= self.sync_every

    def step(self) -> bool:
        """Call after each inner optimizer step. Returns True when this call committed an outer step."""
        self.local_step += 1
        if self.local_step < self.sync_every:
            return False
        self.local_step = 0
        return self.sync()

    def sync(self) -> bool:
        """Average pseudo-gradients across groups and take the outer step; False if the round was dropped."""
        self._step_at_sync = self.manager.current_step()
        self._start_quorum()  # blocks; a group behind the others heals here (_load_healed_state)
        return self._reduce_and_step(self._pseudo_gradient())

    def agree_initial_weights(self, attempts: int = 3) -> None:
        """Before the first inner step of a fresh run: every group takes the initial weights of the quorum's
        first group (participating rank 0), whatever the model's factory did (unseeded, seeded per group).

        One quorum and one all-reduce in which rank 0 sends its weights and the others zeros. The buffer has
        the layout of a sync's, so a group that meets others in the middle of a sync joins it instead: it
        heals to their step (at a later step) and contributes nothing; at step 0, its weights would spoil
        their average, so the round is dropped for all, and everyone restores its global weights, which the
        step-0 heal just made the quorum's primary's.
        """
        for attempt in range(1, attempts + 1):
            self._step_at_sync = self.manager.current_step()
            self._start_quorum()
            if self.manager.current_step() > self._step_at_sync:  # healed: the others are syncing a later step
                self._healed = False
                self._reduce_and_step(self._empty_flat())
                return
            flat = self._empty_flat()
            if self.manager.participating_rank() == 0:
                offset = 0
                with torch.no_grad():
                    for p in self._params:
                        flat[offset : offset + p.numel()].copy_(p.detach().view(-1))
                        offset += p.numel()
                flat[-1] = 1.0
            self.manager.allreduce(flat, reduce_op=ReduceOp.SUM).wait()
            if self.manager.errored() is None and float(flat[-2]) == 0 and float(flat[-1]) == 1:
                with torch.no_grad():  # everyone in the quorum is starting: take rank 0's weights
                    offset = 0
                    for p in self._params:
                        p.copy_(flat[offset : offset + p.numel()].view_as(p))
                        offset += p.numel()
                self._save_backup()
                return
            if self.manager.errored() is None and float(flat[-2]) > 0:  # met a sync at step 0: see above
                self._commit_and_step(flat)
                return
            logger.warning("no agreement on the initial weights (attempt %d of %d)", attempt, attempts)
        raise RuntimeError(f"the groups did not agree on initial weights in {attempts} attempts")

    def _empty_flat(self) -> torch.Tensor:
        numel = sum(p.numel() for p in self._params)
        return torch.zeros(numel + 2, dtype=torch.float32, device=self._params[0].device)

    def _reduce_and_step(self, flat: torch.Tensor) -> bool:
        """Sum ``flat`` (payload, contributors, initial weights sent) across the quorum; commit; step."""
        self.manager.allreduce(flat, reduce_op=ReduceOp.SUM).wait()
        return self._commit_and_step(flat)

    def _commit_and_step(self, flat: torch.Tensor) -> bool:
        if float(flat[-1]) > 0:
            # a starting group sent its initial weights into this round (agree_initial_weights): no average
            self.manager.report_error(RuntimeError("a starting group's initial weights reached this sync"))
        if not self.manager.should_commit():
            logger.warning(
                "outer step %d not committed: discarding the last inner steps", self.manager.current_step() + 1
            )
            self._restore_backup()
            return False
        self._restore_backup()
        contributors = float(flat[-2])
        if contributors > 0:
            self._apply_outer_step(flat[:-2].div_(contributors))  # in place: no second copy of the model
        return True

    # --- pieces ------------------------------------------------------------------------------------------
    def _start_quorum(self) -> None:
        """torchft's quorum, retried while the lighthouse is away (restarted, or its node rebooting)."""
        deadline = time.monotonic() + self.quorum_retry_s
        while True:
            try:
                self.manager.start_quorum()
                return
            except Exception as e:  # noqa: BLE001 - gRPC surfaces as several types; retried, then re-raised
                # torchft keeps the failed quorum and re-raises it on every later call: forget it to retry
                self.manager._quorum_future = None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no quorum for {self.quorum_retry_s:g}s (is the lighthouse up?): {e}") from e
                logger.warning(
                    "quorum failed (%s: %s); retrying until the lighthouse answers",
                    type(e).__name__,
                    str(e).splitlines()[0][:200],
                )
                time.sleep(1.0)

    @torch.no_grad()
    def _pseudo_gradient(self) -> torch.Tensor:
        """``global - local`` of every parameter in one flat buffer, plus two elements: 1 if it counts, and 0
        (the count of initial weights sent, see :meth:`agree_initial_weights`)."""
        device = self._params[0].device
        numel = sum(p.numel() for p in self._params)
        flat = torch.empty(numel + 2, dtype=torch.float32, device=device)
        offset = 0
        for p, backup in zip(self._params, self._backup, strict=True):
            n = p.numel()
            torch.sub(backup.to(device, non_blocking=True).view(-1), p.view(-1), out=flat[offset : offset + n])
            offset += n
        if self._healed:  # our local weights predate the global ones we just received
            flat.zero_()
            self._healed = False
        else:
            flat[-2], flat[-1] = 1.0, 0.0
        return flat

    @torch.no_grad()
    def _apply_outer_step(self, avg: torch.Tensor) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            p.grad = avg[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self._save_backup()

    @torch.no_grad()
    def _save_backup(self) -> None:
        for p, backup in zip(self._params, self._backup, strict=True):
            backup.copy_(p.detach())  # blocking: a checkpoint writer may read the backup next

    @torch.no_grad()
    def _restore_backup(self) -> None:
        for p, backup in zip(self._params, self._backup, strict=True):
            p.copy_(backup, non_blocking=False)
