"""Adapter layers: drop-in replacements for ``nn.Linear`` / transformers ``Conv1D``."""

from fedlora.layers._base import AdapterLayer, base_features, is_conv1d
from fedlora.layers.lora import LoRALinear, lora_init_A
from fedlora.layers.ravan import RavanLinear, ravan_bases
from fedlora.layers.segments import SegmentPlan, route

__all__ = [
    "AdapterLayer",
    "LoRALinear",
    "RavanLinear",
    "SegmentPlan",
    "base_features",
    "is_conv1d",
    "lora_init_A",
    "ravan_bases",
    "route",
]
