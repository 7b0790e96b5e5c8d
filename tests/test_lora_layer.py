"""LoRALinear: invariants, masks, prefix state dicts, and equality with PEFT's own LoRA layer."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS
from numerics import EPS32, assert_as_accurate
from torch import nn

import fedlora


def randomise(layer: fedlora.LoRALinear) -> None:
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()


def test_starts_as_the_base_layer_and_freezes_it():
    base = nn.Linear(45, 29)
    layer = fedlora.LoRALinear(base, rank=5, alpha=10)
    x = torch.randn(3, 7, 45)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.scale == 2.0
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_peft_lora_layer(backend, monkeypatch):
    """Same A, B and scaling alpha/R: our forward and gradients equal PEFT's Linear."""
    pytest.importorskip("peft")
    from fedlora.peft_compat import peft_lora_linear

    monkeypatch.setenv("FEDLORA_BACKEND", backend)
    base = nn.Linear(45, 29)
    ours = fedlora.LoRALinear(base, rank=6, alpha=12)
    randomise(ours)
    ref_base = nn.Linear(45, 29)
    ref_base.load_state_dict(base.state_dict())
    ref = peft_lora_linear(ref_base, r=6, alpha=12)
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(ours.lora_A[0])
        ref.lora_B["default"].weight.copy_(ours.lora_B[0])
    x = torch.randn(37, 45)
    y, y_ref = ours(x), ref(x)
    # both are float32 evaluations of one function: as close to float64 as PEFT's own
    A64, B64 = ours.lora_A[0].detach().double(), ours.lora_B[0].detach().double()
    A64.requires_grad_(True)
    B64.requires_grad_(True)
    y64 = base(x).double() + 2.0 * (x.double() @ A64.T) @ B64.T
    assert_as_accurate(y, y_ref, y64)
    g = torch.randn_like(y)
    gA, gB = torch.autograd.grad(y, (ours.lora_A, ours.lora_B), g)
    rA, rB = torch.autograd.grad(
        y_ref, (ref.lora_A["default"].weight, ref.lora_B["default"].weight), g
    )
    eA, eB = torch.autograd.grad(y64, (A64, B64), g.double())
    assert_as_accurate(gA[0], rA, eA, what="grad A")
    assert_as_accurate(gB[0], rB, eB, what="grad B")


def test_kaiming_init_matches_peft_distribution_and_seed():
    a = fedlora.LoRALinear(nn.Linear(400, 8), rank=4, seed=3)
    b = fedlora.LoRALinear(nn.Linear(400, 8), rank=4, seed=3)
    c = fedlora.LoRALinear(nn.Linear(400, 8), rank=4, seed=4)
    assert torch.equal(a.lora_A, b.lora_A) and not torch.equal(a.lora_A, c.lora_A)
    bound = 1 / 400**0.5
    assert a.lora_A.abs().max() <= bound and a.lora_A.abs().max() > 0.9 * bound
    assert (a.lora_B == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_mask_truncates_and_delta_weight_matches(backend, monkeypatch):
    monkeypatch.setenv("FEDLORA_BACKEND", backend)
    base = nn.Linear(24, 18)
    layer = fedlora.LoRALinear(base, rank=8, alpha=8, num_clients=2)
    randomise(layer)
    layer.set_rank(3, slot=1)
    x = torch.randn(10, 24)
    layer.set_segments(torch.tensor([0, 4, 10]), torch.tensor([1, 0]))
    y = layer(x)
    layer.set_segments(None)
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    dw1 = B[1][:, :3] @ A[1][:3]  # prefix of 3 components, scale 1
    dw0 = B[0] @ A[0]
    torch.testing.assert_close(layer.delta_weight(1).double(), dw1, atol=1e-5, rtol=1e-5)
    xd = x.double()
    expect = torch.cat([xd[:4] @ dw1.T, xd[4:] @ dw0.T]) + base(x).double()
    torch.testing.assert_close(y.double(), expect, atol=1e-4, rtol=1e-4)


def test_trainable_components_get_exactly_zero_gradient_elsewhere():
    layer = fedlora.LoRALinear(nn.Linear(24, 18), rank=6, num_clients=2)
    randomise(layer)
    layer.set_trainable([0, 4], slot=0)
    layer.set_trainable(2, slot=1)  # prefix of 2
    layer.set_segments(torch.tensor([0, 5, 9]), torch.tensor([0, 1]))
    layer(torch.randn(9, 24)).square().sum().backward()
    gA, gB = layer.lora_A.grad, layer.lora_B.grad
    for slot, trained in ((0, {0, 4}), (1, {0, 1})):
        for j in range(6):
            nz = gA[slot, j].abs().sum() > 0 and gB[slot, :, j].abs().sum() > 0
            assert nz == (j in trained), (slot, j)


def test_prefix_state_round_trip():
    layer = fedlora.LoRALinear(nn.Linear(24, 18), rank=8)
    randomise(layer)
    state = layer.adapter_state()
    other = fedlora.LoRALinear(nn.Linear(24, 18), rank=8)
    other.load_adapter_state(
        {
            "lora_A.weight": state["lora_A.weight"][:3],
            "lora_B.weight": state["lora_B.weight"][:, :3],
        }
    )
    assert other.rank_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert (other.lora_A[0, 3:] == 0).all() and (other.lora_B[0, :, 3:] == 0).all()
    torch.testing.assert_close(other.lora_A[0, :3], state["lora_A.weight"][:3])
    with pytest.raises(ValueError, match=r"lora_B.weight must have shape \[18, 3\]"):
        other.load_adapter_state(
            {"lora_A.weight": state["lora_A.weight"][:3], "lora_B.weight": state["lora_B.weight"]}
        )
    with pytest.raises(ValueError, match="NaN or inf"):
        bad = state["lora_A.weight"].clone()
        bad[0, 0] = float("nan")
        other.load_adapter_state({"lora_A.weight": bad, "lora_B.weight": state["lora_B.weight"]})


def test_merge_unmerge_and_conv1d():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    for base in (nn.Linear(24, 18), Conv1D(18, 24)):
        w0 = base.weight.detach().clone()
        layer = fedlora.LoRALinear(base, rank=4, alpha=4)
        randomise(layer)
        x = torch.randn(5, 24)
        with torch.no_grad():
            y = layer(x)
            expect = base(x).double() + x.double() @ layer.delta_weight().double().T
            torch.testing.assert_close(y.double(), expect, atol=1e-4, rtol=1e-4)
            dw = layer.delta_weight()
            layer.merge()
            assert_as_accurate(layer(x), y, expect, what="merged")
            layer.unmerge()
        # (W + dW) - dW in float32: two roundings of at most |W| + |dW| each, elementwise (no
        # BLAS order involved), so the bound holds on every machine
        bound = 2 * EPS32 * (float(w0.abs().max()) + float(dw.abs().max()))
        torch.testing.assert_close(base.weight, w0, atol=bound, rtol=0)
    assert transformers is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        fedlora.LoRALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError, match="init must be one of"):
        fedlora.LoRALinear(nn.Linear(4, 4), init="zeros")
    layer = fedlora.LoRALinear(nn.Linear(4, 4), rank=2)
    with pytest.raises(ValueError, match=r"a rank must lie in \[0, 2\]"):
        layer.set_rank(3)
    with pytest.raises(ValueError, match=r"component indices must lie in \[0, 2\)"):
        layer.set_trainable([2])
