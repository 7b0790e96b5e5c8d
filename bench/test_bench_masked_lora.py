"""CPU benchmark of the masked-LoRA family (pytest-benchmark): ours beside the floor and PEFT.

    python -m pytest bench/test_bench_masked_lora.py --benchmark-only --benchmark-group-by=group

Rows per shape (float32): bare ``F.linear`` (the floor), base + a PEFT-style eager adapter
(``lora_B(lora_A(x)) * scale``, what PEFT's ``Linear.forward`` runs with dropout 0), base +
PEFT's own LoRA layer at the same rank (when peft and fedlora are importable), and base +
``fedlora_kernels.masked_lora`` (the CPU path) with all components trainable and with half of
them frozen; forward and forward+backward. Then ``masked_adamw_`` beside
``torch.optim.AdamW`` stepping the same factor. Issue 3's CPU goal: our rows are never slower
than PEFT's at the same rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _timing import benchmark_mode, peft_lora_baseline

import fedlora_kernels as fk

SHAPES = {
    "N256-d1024-R16": (256, 1024, 16),
    "N1024-d1024-R64": (1024, 1024, 64),
}
IMPLS = ["F.linear", "peft-style eager", "peft LoRA", "fedlora", "fedlora half-frozen"]


def _setup(shape):
    n, d, rank = SHAPES[shape]
    torch.manual_seed(0)
    W = torch.randn(d, d) / d**0.5
    A = (torch.randn(rank, d) / d**0.5).requires_grad_(True)
    B = (torch.randn(d, rank) / rank**0.5).requires_grad_(True)
    x = torch.randn(n, d, requires_grad=True)
    half = torch.zeros(rank)
    half[torch.randperm(rank)[: rank // 2]] = 1.0
    return W, A, B, x, half


def _impls(shape):
    W, A, B, x, half = _setup(shape)
    scale = 16.0 / A.shape[0]
    impls = {
        "F.linear": lambda: F.linear(x, W),
        "peft-style eager": lambda: F.linear(x, W) + F.linear(F.linear(x, A), B) * scale,
        "fedlora": lambda: F.linear(x, W) + fk.masked_lora(x, A, B, scale=scale),
        "fedlora half-frozen": lambda: (
            F.linear(x, W) + fk.masked_lora(x, A, B, scale=scale, grad_mask=half)
        ),
    }
    layer = peft_lora_baseline(W, A.shape[0], A=A, B=B)  # None without peft
    if layer is not None:
        impls["peft LoRA"] = lambda: layer(x)
    return impls


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_masked_lora_cpu(benchmark, impl, shape, mode):
    impls = _impls(shape)
    if impl not in impls:
        pytest.skip("peft not installed")
    benchmark.group = f"masked_lora {mode} {shape}"
    benchmark_mode(
        benchmark, impls[impl], mode, rounds=20 if mode == "fwd" else 10, warmup_rounds=2
    )


@pytest.mark.parametrize("impl", ["torch.optim.AdamW", "masked_adamw_ all", "masked_adamw_ half"])
def test_masked_adamw_cpu(benchmark, impl):
    rank, d = 64, 4096
    torch.manual_seed(0)
    p = torch.randn(rank, d, requires_grad=True)
    p.grad = torch.randn(rank, d)
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    benchmark.group = f"masked_adamw_ [{rank}, {d}]"
    if impl == "torch.optim.AdamW":
        opt = torch.optim.AdamW([p], **hp)
        benchmark.pedantic(opt.step, rounds=20, warmup_rounds=2)
        return
    m, v = torch.zeros(rank, d), torch.zeros(rank, d)
    mask = torch.ones(rank)
    if impl.endswith("half"):
        mask[rank // 2 :] = 0
    w, g = p.detach(), p.grad
    benchmark.pedantic(
        lambda: fk.masked_adamw_(w, g, m, v, mask, step=1, **hp), rounds=20, warmup_rounds=2
    )
