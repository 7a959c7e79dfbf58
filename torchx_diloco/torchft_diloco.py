"""``torchft.local_sgd.DiLoCo`` behind our ``DiLoCo``'s interface, so one trainer can run either.

Used by ``--impl torchft``: the equivalence test and the benchmark against torchft compare the two with
everything else (model, data, optimizers, checkpoints, metrics) identical.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch


class TorchftDiLoCo:
    """``torchft.local_sgd.DiLoCo`` behind our interface, so benchmarks and tests can compare the two."""

    def __init__(
        self,
        manager: Any,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        sync_every: int,
    ) -> None:
        from torchft.local_sgd import DiLoCo as _TorchftDiLoCo

        self.manager = manager
        self.outer_optimizer = outer_optimizer
        self._impl = _TorchftDiLoCo(
            manager, [model], inner_optimizer, outer_optimizer, sync_every=sync_every, backup_device=torch.device("cpu")
        )
        self._impl.__enter__()  # hooks the inner optimizer: the sync runs inside its H-th step()
        self._fragment = self._impl._fragments[0]
        self._last_step = manager.current_step()
        self.sync_every = sync_every
        self.local_step = 0  # inner steps since the last sync (torchft counts the same inside its hook)

    @property
    def sync_due(self) -> bool:
        """True when the next inner optimizer step syncs (torchft syncs inside it)."""
        return self.local_step + 1 >= self.sync_every

    def step(self) -> bool:
        self.local_step = (self.local_step + 1) % self.sync_every
        step = self.manager.current_step()
        committed, self._last_step = step > self._last_step, step
        return committed

    def global_weights(self) -> List[torch.Tensor]:
        return list(self._fragment.original_parameters.values())

    def state_dict(self) -> Dict[str, Any]:
        return {
            "global_weights": dict(self._fragment.original_parameters),
            "outer_optimizer": self.outer_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, t in self._fragment.original_parameters.items():
            t.copy_(state["global_weights"][name])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self._fragment.restore_parameters()
        self._last_step = self.manager.current_step()
        self.local_step = 0
