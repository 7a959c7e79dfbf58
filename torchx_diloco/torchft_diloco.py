"""``torchft.local_sgd.DiLoCo`` behind our ``DiLoCo``'s interface, so one trainer can run either.

Used by ``--impl torchft``: the equivalence test and the benchmark against torchft compare the two with
everything else (model, data, optimizers, fragments, checkpoints, metrics) identical.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn

from torchx_diloco.codecs import ring_allreduce_bytes
from torchx_diloco.diloco import split_evenly


class TorchftDiLoCo:
    """``torchft.local_sgd.DiLoCo`` (Streaming, fp32) on the same fragments as ours, behind our interface."""

    def __init__(
        self,
        manager: Any,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        sync_every: int,
        fragments: int = 1,
        overlap_steps: int = 0,
        mix_alpha: float = 0.0,
    ) -> None:
        from torchft.local_sgd import DiLoCo as _TorchftDiLoCo

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        parts = split_evenly([p.numel() for _, p in named], fragments)
        modules = [nn.ParameterList([named[i][1] for i in part]) for part in parts]
        self._names = [[named[i][0] for i in part] for part in parts]  # ours, per fragment, in their order
        self.manager = manager
        self.outer_optimizer = outer_optimizer
        # One outer optimizer per fragment, like ours: torchft's fragments sharing one diverge between groups
        # (measured with 0.2.0: two groups, 2 fragments, overlap 1, max weight difference 0.5 after 3 H)
        self._outers = (
            [type(outer_optimizer)(m.parameters(), **outer_optimizer.defaults) for m in modules]
            if fragments > 1
            else [outer_optimizer]
        )
        self._impl = _TorchftDiLoCo(
            manager,
            modules,
            inner_optimizer,
            self._outers if fragments > 1 else outer_optimizer,
            sync_every=sync_every,
            backup_device=torch.device("cpu"),
            fragment_sync_delay=overlap_steps,
            fragment_update_alpha=mix_alpha,
        )
        self._impl.__enter__()  # hooks the inner optimizer: the sync runs inside its step()
        self._fragments = self._impl._fragments
        self._last_step = manager.current_step()
        self.sync_every = sync_every
        self.steps_per_sync = sync_every // fragments
        self.overlap_steps = overlap_steps
        self.local_differs_from_global = fragments > 1 or mix_alpha > 0
        self.local_step = 0  # inner steps since the last outer step (torchft counts the same inside its hook)
        self.last_sync: Dict[str, int] = {}

    @property
    def quorum_due(self) -> bool:
        return self.local_step + 1 == self.steps_per_sync - self.overlap_steps

    @property
    def sync_due(self) -> bool:
        """True when the next inner optimizer step starts a quorum or applies a fragment (torchft does both
        inside it)."""
        return self.quorum_due or self.local_step + 1 >= self.steps_per_sync

    def step(self) -> bool:
        self.local_step = (self.local_step + 1) % self.steps_per_sync
        step = self.manager.current_step()
        committed, self._last_step = step > self._last_step, step
        if committed:
            fragment = (step - 1) % len(self._fragments)
            numel = sum(t.numel() for t in self._fragments[fragment].original_parameters.values())
            sent = ring_allreduce_bytes(4 * numel, self.manager.num_participants())
            self.last_sync = {"fragment": fragment, "sent_bytes": sent}
        return committed

    def close(self) -> None:
        self._impl.__exit__(None, None, None)

    def _global(self) -> List[tuple]:
        return [
            (name, t)
            for names, f in zip(self._names, self._fragments, strict=True)
            for name, t in zip(names, f.original_parameters.values(), strict=True)
        ]

    def global_weights(self) -> List[torch.Tensor]:
        return [t for _, t in self._global()]

    def state_dict(self) -> Dict[str, Any]:
        outer: Any = [o.state_dict() for o in self._outers] if len(self._outers) > 1 else self._outers[0].state_dict()
        return {"global_weights": dict(self._global()), "outer_optimizer": outer}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, t in self._global():
            t.copy_(state["global_weights"][name])
        outer = state["outer_optimizer"]
        for o, s in zip(self._outers, outer if isinstance(outer, list) else [outer], strict=True):
            o.load_state_dict(s)
        for f in self._fragments:
            f.restore_parameters()
        self._last_step = self.manager.current_step()
        self.local_step = 0
