"""Adapter layers: drop-in replacements for ``nn.Linear`` / transformers ``Conv1D``."""

from fedlora.layers._base import AdapterLayer, base_features
from fedlora.layers.lora import LoRALinear
from fedlora.layers.ravan import RavanLinear, ravan_bases

__all__ = ["AdapterLayer", "LoRALinear", "RavanLinear", "base_features", "ravan_bases"]
