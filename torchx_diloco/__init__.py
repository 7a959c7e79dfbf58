"""torchx-diloco: DiLoCo training across fault-tolerant replica groups (torchft), launched with TorchX.

The public API, for your own training loop (``torchx run diloco.diloco --script my_train.py``):

- ``DiLoCo(manager, model, inner_optimizer, outer_optimizer, sync_every)``: the outer loop; call its ``step()``
  after every inner optimizer step.
- ``group_manager(device)``: torchft's ``Manager`` for this replica group, built from the environment the
  components set (``REPLICA_GROUP_ID``, ``NUM_REPLICA_GROUPS``, ``TORCHFT_LIGHTHOUSE``, ``TORCHX_DILOCO_RUN_ID``),
  under torchrun or not; it waits for the lighthouse and checks that it serves this run.
- ``CheckpointStore(url)``: durable, verified checkpoints on any fsspec URL (``GLOBAL_PART``, ``group_part``
  name the parts).
- ``UserError``: what they raise for input only you can fix (one line, with the fix).

The names are imported lazily, so that the TorchX components can import the torch-free parts
(``torchx_diloco.config``) without paying for torch. See the README's "Python API" and examples/own_loop.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any, Dict, List

__version__ = "0.1.0"
__all__ = ["DiLoCo", "group_manager", "CheckpointStore", "GLOBAL_PART", "group_part", "UserError", "export"]

_LAZY: Dict[str, str] = {
    "DiLoCo": "torchx_diloco.diloco",
    "group_manager": "torchx_diloco.cluster",
    "CheckpointStore": "torchx_diloco.checkpoint",
    "GLOBAL_PART": "torchx_diloco.checkpoint",
    "group_part": "torchx_diloco.checkpoint",
    "UserError": "torchx_diloco.errors",
    "export": "torchx_diloco.export",
}

if TYPE_CHECKING:
    from torchx_diloco.checkpoint import GLOBAL_PART, CheckpointStore, group_part
    from torchx_diloco.cluster import group_manager
    from torchx_diloco.diloco import DiLoCo
    from torchx_diloco.errors import UserError
    from torchx_diloco.export import export


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'torchx_diloco' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted([*globals(), *__all__])
