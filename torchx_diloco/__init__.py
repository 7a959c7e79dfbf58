"""torchx-diloco: DiLoCo training across fault-tolerant replica groups (torchft), launched with TorchX."""

from torchx_diloco.diloco import DiLoCo

__all__ = ["DiLoCo"]
__version__ = "0.1.0"
