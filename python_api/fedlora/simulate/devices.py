"""``--device`` and ``--dtype``: where the run trains and in which precision the frozen base runs.

The adapters, the classifier head and the optimizer state are always float32; ``--dtype`` is the
frozen base model's dtype (bf16 on a GPU by default: half the memory traffic of the base, the
tensor-core path of the Triton kernels). Every check here runs before any training and fails
with a one-line :class:`~fedlora.simulate.errors.ConfigError`.
"""

from __future__ import annotations

import platform

import torch

from fedlora.simulate.errors import ConfigError

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")


def check_device_name(name: object) -> None:
    """``name`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (availability is checked later)."""
    ok = isinstance(name, str) and (
        name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit())
    )
    if not ok:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)} or cuda:N; got {name!r}")


def resolve_device(name: str) -> torch.device:
    """The torch device of ``--device``: ``auto`` is the GPU when there is one, else the CPU."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
            "torch.cuda.is_available() is False); use --device cpu"
        )
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86: AVX512-BF16 or AMX; other CPUs: assumed,
    torch has no probe for them). Without it torch emulates bf16 at a fraction of fp32's speed."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    cpu = torch.cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, p, lambda: False)()) for p in probes)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: ``auto`` is bf16 on a GPU that supports it, else float32."""
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    if name == "float32":
        return torch.float32
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if name == "bfloat16":
            raise ConfigError(f"--dtype bfloat16: the GPU {device} does not support bf16")
        return torch.float32
    if name == "auto":
        return torch.float32
    if not cpu_supports_bf16():
        raise ConfigError(
            "--dtype bfloat16: this CPU has no native bf16 (no AVX512-BF16 or AMX); torch would "
            "emulate it slowly; use --dtype float32"
        )
    return torch.bfloat16


def adapters_to_float32(model: torch.nn.Module) -> None:
    """Under a low-precision base, keep in float32 what trains and what the server averages:
    every parameter and buffer of the adapter layers except their frozen base layer, and every
    other trainable parameter (the classifier head)."""
    from fedlora.state_dict import adapter_layers

    def cast(module: torch.nn.Module, skip: str | None) -> None:
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if skip is not None and name.startswith(skip):
                continue
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()

    for _, layer in adapter_layers(model):
        cast(layer, "base_layer.")
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
