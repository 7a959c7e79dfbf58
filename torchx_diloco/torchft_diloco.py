"""``torchft.local_sgd.DiLoCo`` behind our outer loop's interface, so one trainer can run either.

Used by ``--impl torchft``: the equivalence test and the benchmark against torchft compare the two with
everything else (model, data, optimizers, fragments, checkpoints, metrics) identical.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from torchx_diloco.codecs import ring_allreduce_bytes
from torchx_diloco.fragment import split_evenly
from torchx_diloco.outer_loop import Schedule, Upcoming


class TorchftDiLoCo:
    """``torchft.local_sgd.DiLoCo`` (Streaming, fp32) on the same fragments as ours, behind our interface.

    torchft syncs inside the inner optimizer's ``step()`` (a hook); ``sync_s`` is the time spent in that hook.
    It has no initial-weight agreement (``--seed`` makes the groups start alike) and no way for a group to sit
    out a round, so it does not adopt newer steps from storage.
    """

    adopts_from_storage = False

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
        self._params = [[named[i][1] for i in part] for part in parts]
        self.manager = manager
        # One outer optimizer per fragment, like ours: torchft's fragments sharing one diverge between groups
        # (measured with 0.2.0: two groups, 2 fragments, overlap 1, max weight difference 0.5 after 3 H)
        self.outer_optimizers = (
            [type(outer_optimizer)(m.parameters(), **outer_optimizer.defaults) for m in modules]
            if fragments > 1
            else [outer_optimizer]
        )
        self._hook_started = 0.0
        self._window_sync_s = 0.0
        # runs before torchft's own post-step hook (registered first), the second one after it: their gap is the sync
        inner_optimizer.register_step_post_hook(self._before_torchft)
        self._impl = _TorchftDiLoCo(
            manager,
            modules,
            inner_optimizer,
            self.outer_optimizers if fragments > 1 else outer_optimizer,
            sync_every=sync_every,
            backup_device=torch.device("cpu"),
            fragment_sync_delay=overlap_steps,
            fragment_update_alpha=mix_alpha,
        )
        self._impl.__enter__()  # hooks the inner optimizer: the sync runs inside its step()
        inner_optimizer.register_step_post_hook(self._after_torchft)
        self._fragments = self._impl._fragments
        self._last_step = manager.current_step()
        self.schedule = Schedule(sync_every, fragments, overlap_steps)
        self.local_differs_from_global = fragments > 1 or mix_alpha > 0
        self.local_step = 0  # inner steps since the last outer step (torchft counts the same inside its hook)
        self.last_sync: Dict[str, Any] = {}

    def _before_torchft(self, *_: Any) -> None:
        self._hook_started = time.perf_counter()

    def _after_torchft(self, *_: Any) -> None:
        if self.upcoming().changes_global:  # (local_step is counted in step(), after the inner step)
            self._window_sync_s += time.perf_counter() - self._hook_started

    def upcoming(self) -> Upcoming:
        return self.schedule.upcoming(self.manager.current_step(), self.local_step)

    def step(self) -> bool:
        ends = self.upcoming().ends_window
        self.local_step = (self.local_step + 1) % self.schedule.steps_per_sync
        step = self.manager.current_step()
        committed, self._last_step = step > self._last_step, step
        if ends:
            fragment = (step - 1) % len(self._fragments) if committed else self.schedule.fragment_at(step)
            numel = sum(t.numel() for t in self._fragments[fragment].original_parameters.values())
            sent = ring_allreduce_bytes(4 * numel, self.manager.num_participants())
            self.last_sync = {"fragment": fragment, "sent_bytes": sent, "sync_s": self._window_sync_s}
            self._window_sync_s = 0.0
        return committed

    def sync(self) -> bool:
        raise NotImplementedError("torchft's DiLoCo syncs inside the inner optimizer's step: no sync to apply")

    def agree_initial_weights(self) -> None:
        """Nothing: torchft's groups start alike from ``--seed``."""

    def close(self) -> None:
        self._impl.__exit__(None, None, None)

    def global_tensors(self) -> List[Tuple[str, nn.Parameter, torch.Tensor]]:
        return [
            (name, p, t)
            for names, params, f in zip(self._names, self._params, self._fragments, strict=True)
            for name, p, t in zip(names, params, f.original_parameters.values(), strict=True)
        ]

    def global_weights(self) -> List[torch.Tensor]:
        return [t for _, _, t in self.global_tensors()]

    def state_dict(self) -> Dict[str, Any]:
        outer = [o.state_dict() for o in self.outer_optimizers]
        weights = {name: t for name, _, t in self.global_tensors()}
        return {"global_weights": weights, "outer_optimizer": outer if len(outer) > 1 else outer[0]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        with torch.no_grad():
            for name, _, t in self.global_tensors():
                t.copy_(state["global_weights"][name])
        outer = state["outer_optimizer"]
        for o, s in zip(self.outer_optimizers, outer if isinstance(outer, list) else [outer], strict=True):
            o.load_state_dict(s)
        self.reset_to_global(newer=False)

    def adopt_newer_global_state(self, state: Dict[str, Any]) -> None:
        self.load_state_dict(state)

    def rank_state(self, template: bool = False) -> Dict[str, torch.Tensor]:
        return {}  # torchft has no error feedback and no delayed outer step

    def load_rank_state(self, saved: Mapping[str, torch.Tensor]) -> None:
        pass

    def reset_to_global(self, newer: bool) -> None:
        for f in self._fragments:
            f.restore_parameters()
        self._last_step = self.manager.current_step()
        self.local_step = 0
