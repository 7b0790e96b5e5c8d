"""PEFT version differences in one place (the baselines in tests and benchmarks use PEFT itself)."""

from __future__ import annotations

import inspect

from torch import nn


def peft_lora_linear(base: nn.Module, r: int, alpha: float) -> nn.Module:
    """PEFT's LoRA layer around ``base`` with adapter ``"default"``, rank ``r``, no dropout."""
    import peft

    cls = peft.tuners.lora.Linear
    kwargs = {"r": r, "lora_alpha": alpha, "lora_dropout": 0.0}
    if "config" in inspect.signature(cls.__init__).parameters:
        kwargs["config"] = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
    return cls(base, "default", **kwargs)
