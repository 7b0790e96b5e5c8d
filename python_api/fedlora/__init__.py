"""fedlora: the thin API over fedlora_kernels for federated LoRA-family fine-tuning.

- layers: :class:`RavanLinear`, :class:`LoRALinear` (drop-in ``nn.Linear`` / ``Conv1D`` wrappers);
- :func:`inject` adapters into a model, :func:`get_adapter_state_dict` /
  :func:`set_adapter_state_dict` in PEFT-style flat dicts;
- :func:`aggregate` / :class:`Aggregator`: the whole server side of every method, on state dicts;
- ``fedlora simulate``: the reference federated training loop (:mod:`fedlora.cli`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterLayer": "fedlora.layers._base",
    "RavanLinear": "fedlora.layers.ravan",
    "LoRALinear": "fedlora.layers.lora",
    "inject": "fedlora.injection",
    "get_adapter_state_dict": "fedlora.state_dict",
    "set_adapter_state_dict": "fedlora.state_dict",
    "adapter_layers": "fedlora.state_dict",
    "apply_base_merges": "fedlora.state_dict",
    "aggregate": "fedlora.aggregation",
    "Aggregator": "fedlora.aggregation",
    "METHODS": "fedlora.aggregation",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
