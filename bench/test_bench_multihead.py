"""CPU benchmark of the multi-head adapter (pytest-benchmark): ours beside the floor and eager torch.

    python -m pytest bench/test_bench_multihead.py --benchmark-only --benchmark-group-by=param:shape

Rows per shape: bare ``F.linear`` (the floor), base + an eager per-head PyTorch composite (what a
user writes by hand), base + PEFT's LoRA layer at the same total rank (when peft is installed),
and base + ``fedlora_kernels.multihead_lora`` (the CPU path), forward and forward+backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _timing import benchmark_mode, peft_lora_baseline

import fedlora_kernels as fk

SHAPES = {
    "N256-d1024-h4r16": (256, 1024, 1024, 4, 16),
    "N2048-d1024-h8r8": (2048, 1024, 1024, 8, 8),
}


def _setup(shape):
    n, d_in, d_out, h, r = SHAPES[shape]
    torch.manual_seed(0)
    W = torch.randn(d_out, d_in) / d_in**0.5
    A = torch.randn(h, r, d_in) / d_in**0.5
    B = torch.randn(h, d_out, r) / r**0.5
    H = torch.randn(1, h, r, r, requires_grad=True)
    s = torch.ones(1, h, requires_grad=True)
    x = torch.randn(n, d_in, requires_grad=True)
    return W, A, B, H, s, x


def _eager(x, W, A, B, H, s):
    y = F.linear(x, W)
    for i in range(A.shape[0]):  # per head: shrink, core, expand
        y = y + s[0, i] * ((x @ A[i].T) @ H[0, i].T) @ B[i].T
    return y


def _impls(shape):
    W, A, B, H, s, x = _setup(shape)
    impls = {
        "F.linear": lambda: F.linear(x, W),
        "eager": lambda: _eager(x, W, A, B, H, s),
        "fedlora": lambda: F.linear(x, W) + fk.multihead_lora(x, A, B, H, s),
    }
    peft_layer = peft_lora_baseline(W, A.shape[0] * A.shape[1])  # the same total rank
    if peft_layer is not None:
        impls["peft LoRA"] = lambda: peft_layer(x)
    return impls, x


@pytest.mark.parametrize("impl", ["F.linear", "eager", "peft LoRA", "fedlora"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_multihead_cpu(benchmark, impl, shape, mode):
    impls, _ = _impls(shape)
    if impl not in impls:
        pytest.skip("peft not installed")
    benchmark.group = f"{mode} {shape}"
    benchmark_mode(benchmark, impls[impl], mode)
