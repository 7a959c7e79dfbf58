"""torchx-diloco: DiLoCo training across fault-tolerant replica groups (torchft), launched with TorchX.

The public API is imported lazily, so that the TorchX components can import the torch-free parts
(``torchx_diloco.config``) without paying for torch.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["DiLoCo"]

if TYPE_CHECKING:
    from torchx_diloco.diloco import DiLoCo


def __getattr__(name: str) -> Any:
    if name == "DiLoCo":
        from torchx_diloco.diloco import DiLoCo

        return DiLoCo
    raise AttributeError(f"module 'torchx_diloco' has no attribute {name!r}")
