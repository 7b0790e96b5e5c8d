"""fedlora_kernels: the ops behind fedlora (no nn.Modules, no federated logic).

Each op validates its inputs, then dispatches by device: CUDA tensors run fused Triton kernels,
CPU tensors run the pure-PyTorch functions of :mod:`fedlora_kernels.reference`. ``backend=`` or the
``FEDLORA_BACKEND`` environment variable force one.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use, so importing the package is cheap
# and a missing optional dependency only matters to the op that needs it)
_EXPORTS = {
    "multihead_lora": "fedlora_kernels.ops.multihead",
    "masked_lora": "fedlora_kernels.ops.masked_lora",
    "masked_adamw_": "fedlora_kernels.ops.masked_adamw",
    "masked_weighted_mean": "fedlora_kernels.ops.masked_mean",
    "resolve_backend": "fedlora_kernels._dispatch",
    "RowSegments": "fedlora_kernels.segments",
}

__all__ = [*_EXPORTS, "__version__", "reference"]


def __getattr__(name: str) -> Any:
    if name == "reference":
        return importlib.import_module("fedlora_kernels.reference")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedlora_kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
