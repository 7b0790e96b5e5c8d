"""A 4-bit / 8-bit frozen base (QLoRA) through bitsandbytes, with fedlora's adapters on top.

:func:`quantize_base` replaces every ``nn.Linear`` inside a model's repeated blocks (the
decoder layers: attention and MLP projections; embeddings and the LM head stay in the model's
dtype, as in QLoRA) by bitsandbytes' ``Linear4bit`` (NF4 with double quantization, computing in
the model's dtype) or ``Linear8bitLt`` (LLM.int8(), outlier threshold 6.0). Both are
``nn.Linear`` subclasses, so :func:`fedlora.inject` wraps them like any base layer: every
method's adapters, slots and kernels run unchanged on top, in float32.

bitsandbytes runs on CUDA, and since its 0.47 release on CPU (its own CPU kernels for NF4/FP4
and int8; tested here with 0.50.2). :func:`check_backend` quantizes and runs a tiny layer on the
device first, so a missing package or backend is one :class:`ValueError` before any model loads.

Methods that fold updates into the frozen base (FLoRA, FedEx-LoRA) work on a quantized base
through :func:`dense_weight` / :func:`set_dense_weight`: dequantize, add, quantize again (so
the base carries the quantization error of each merge, as any merged QLoRA model does).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "QUANTIZE",
    "check_backend",
    "dense_weight",
    "is_quantized",
    "quantize_base",
    "set_dense_weight",
]

#: ``--quantize`` choices
QUANTIZE = ("none", "4bit", "8bit")


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError(
            f"needs the bitsandbytes package (pip install 'fedlora-kernels[qlora]'): {err}"
        ) from None
    return bnb


def _quantized(linear: nn.Linear, bits: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes copy of ``linear`` (frozen), quantized on ``device``."""
    bnb = _bnb()
    weight = linear.weight.detach().to("cpu", torch.float32 if dtype == torch.float32 else dtype)
    if bits == "4bit":
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
        )  # fmt: skip
        q.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        # keep one weight layout for training and evaluation: bitsandbytes repacks a CPU weight
        # for inference (no grad, eval mode) in place, a layout its training path does not take
        q.support_avx512bf16_for_cpu = False
    elif bits == "8bit":
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            has_fp16_weights=False, threshold=6.0,
        )  # fmt: skip
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"quantize must be one of 4bit, 8bit; got {bits!r}")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to(dtype).clone(), requires_grad=False)
    return q.to(device)


def check_backend(bits: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Quantize and run (forward and backward to the input) a tiny layer on ``device``;
    ValueError saying what is missing otherwise."""
    if bits not in QUANTIZE[1:]:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}; got {bits!r}")
    bnb = _bnb()
    device = torch.device(device)
    try:
        q = _quantized(nn.Linear(64, 16), bits, dtype, device)
        x = torch.randn(3, 64, device=device, dtype=dtype, requires_grad=True)
        q(x).float().sum().backward()
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            raise RuntimeError("no finite gradient reaches the input")
    except Exception as err:  # a backend that is not there fails in many ways
        raise ValueError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} has no working {bits} backend on "
            f"{device.type} ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
        ) from None


def quantize_base(
    model: nn.Module, bits: str, dtype: torch.dtype, device: torch.device | str
) -> int:
    """Replace the ``nn.Linear`` layers of ``model``'s repeated blocks by bitsandbytes ones
    (``bits``: ``4bit`` or ``8bit``) on ``device``, frozen; the number replaced. Call before
    :func:`fedlora.inject`."""
    from fedlora.local import decoder_blocks

    blocks = decoder_blocks(model)
    if not blocks:
        raise ValueError("quantize: the model has no repeated blocks (decoder layers) to quantize")
    device = torch.device(device)
    count = 0
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, _quantized(child, bits, dtype, device))
                    count += 1
    return count


def is_quantized(linear: nn.Module) -> bool:
    """Whether a base layer's weight is a bitsandbytes quantized one."""
    w = getattr(linear, "weight", None)
    return isinstance(w, torch.Tensor) and not w.is_floating_point()


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The weight ``[out, in]`` in float32: dequantized for a bitsandbytes layer."""
    w = linear.weight
    if not is_quantized(linear):
        return w.detach().float()
    bnb = _bnb()
    state = getattr(w, "quant_state", None)
    if state is not None:  # 4-bit
        return bnb.functional.dequantize_4bit(w.data, state).float()
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = linear.state.SCB
    return w.data.float() * scb.float()[:, None] / 127.0


def set_dense_weight(linear: nn.Module, weight: torch.Tensor) -> None:
    """Quantize ``weight`` ``[out, in]`` into a bitsandbytes layer in place (its kind kept)."""
    bnb = _bnb()
    w = linear.weight
    device = w.device
    if getattr(w, "quant_state", None) is not None:
        dtype = linear.compute_dtype or torch.float32
        new = bnb.nn.Params4bit(
            weight.detach().to("cpu", dtype), requires_grad=False, quant_type=w.quant_type,
            compress_statistics=w.compress_statistics,
        )  # fmt: skip
        linear.weight = new.to(device)
    else:
        linear.weight = bnb.nn.Int8Params(
            weight.detach().to("cpu", torch.float32), requires_grad=False, has_fp16_weights=False
        ).to(device)
        linear.state.reset_grads() if hasattr(linear.state, "reset_grads") else None
        linear.state.SCB = None
        linear.state.CB = None
