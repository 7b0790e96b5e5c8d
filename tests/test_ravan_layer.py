"""RavanLinear: the drop-in layer's invariants, on nn.Linear and transformers' Conv1D."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS
from torch import nn

import fedlora
from fedlora.layers.ravan import ravan_bases


def randomise(layer: fedlora.RavanLinear) -> None:
    with torch.no_grad():
        layer.lora_H.normal_()
        layer.lora_s.uniform_(0.5, 1.5)


def naive_delta(layer: fedlora.RavanLinear, slot: int) -> torch.Tensor:
    """ΔW = scale Σ_i s_i B_i H_i A_i, head by head in float64."""
    A, B = layer.lora_A.double(), layer.lora_B.double()
    H, s = layer.lora_H[slot].detach().double(), layer.lora_s[slot].detach().double()
    return layer.scale * sum(s[i] * B[i] @ H[i] @ A[i] for i in range(layer.heads))


def test_starts_as_the_base_layer():
    base = nn.Linear(45, 29)
    layer = fedlora.RavanLinear(base, heads=3, rank=5)
    x = torch.randn(4, 7, 45)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in base.parameters())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_H", "lora_s"}


@pytest.mark.parametrize("init", ["orthogonal", "gaussian"])
def test_bases_are_seeded_and_shaped(init):
    A1, B1 = ravan_bases(45, 29, 3, 5, init=init, seed=7)
    A2, B2 = ravan_bases(45, 29, 3, 5, init=init, seed=7)
    A3, _ = ravan_bases(45, 29, 3, 5, init=init, seed=8)
    assert A1.shape == (3, 5, 45) and B1.shape == (3, 29, 5)
    assert torch.equal(A1, A2) and torch.equal(B1, B2) and not torch.equal(A1, A3)
    if init == "orthogonal":
        a_cat = A1.reshape(15, 45).double()
        b_cat = B1.permute(1, 0, 2).reshape(29, 15).double()
        torch.testing.assert_close(
            a_cat @ a_cat.T, torch.eye(15, dtype=torch.float64), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            b_cat.T @ b_cat, torch.eye(15, dtype=torch.float64), atol=1e-6, rtol=0
        )


def test_orthogonal_with_more_components_than_dims_is_per_head():
    A, B = ravan_bases(6, 5, 3, 4, seed=0)  # h·r = 12 > d
    for i in range(3):
        torch.testing.assert_close(A[i] @ A[i].T, torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(B[i].T @ B[i], torch.eye(4), atol=1e-5, rtol=0)


def test_bases_identical_across_devices_and_layers_with_same_seed():
    l1 = fedlora.RavanLinear(nn.Linear(33, 20), heads=2, rank=4, seed=3)
    l2 = fedlora.RavanLinear(nn.Linear(33, 20).double(), heads=2, rank=4, seed=3)
    assert torch.equal(l1.lora_A, l2.lora_A.float()) and torch.equal(l1.lora_B, l2.lora_B.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_delta_weight_match_naive(backend, monkeypatch):
    monkeypatch.setenv("FEDLORA_BACKEND", backend)
    base = nn.Linear(45, 29)
    layer = fedlora.RavanLinear(base, heads=3, rank=5, scale=0.7, num_clients=2)
    randomise(layer)
    x = torch.randn(37, 45)
    for slot in range(2):
        dw = naive_delta(layer, slot)
        torch.testing.assert_close(layer.delta_weight(slot).double(), dw, atol=1e-5, rtol=1e-5)
    y = layer(x)
    torch.testing.assert_close(
        y.double(), base(x).double() + x.double() @ naive_delta(layer, 0).T, atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_segments_route_rows_to_slots(backend, monkeypatch):
    monkeypatch.setenv("FEDLORA_BACKEND", backend)
    base = nn.Linear(24, 18)
    layer = fedlora.RavanLinear(base, heads=2, rank=3, num_clients=3)
    randomise(layer)
    x = torch.randn(20, 24)
    layer.set_segments(torch.tensor([0, 8, 20]), torch.tensor([2, 0]))
    y = layer(x)
    layer.set_segments(None)
    xd = x.double()
    expect = torch.cat([xd[:8] @ naive_delta(layer, 2).T, xd[8:] @ naive_delta(layer, 0).T])
    torch.testing.assert_close(y.double(), base(x).double() + expect, atol=1e-4, rtol=1e-4)


def test_merge_unmerge_exact():
    base = nn.Linear(45, 29)
    w0 = base.weight.detach().clone()
    layer = fedlora.RavanLinear(base, heads=3, rank=5, scale=0.5, num_clients=2)
    randomise(layer)
    x = torch.randn(11, 45)
    with torch.no_grad():
        layer.set_segments(torch.tensor([0, 11]), torch.tensor([1]))
        y1 = layer(x)
        layer.set_segments(None)
        layer.merge(slot=1)
        torch.testing.assert_close(layer(x), y1, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge()
        layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)


def test_wraps_transformers_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(29, 45)  # nf = d_out, nx = d_in; weight [d_in, d_out]
    layer = fedlora.RavanLinear(base, heads=3, rank=5)
    randomise(layer)
    x = torch.randn(6, 45)
    expect = base(x).double() + x.double() @ naive_delta(layer, 0).T
    torch.testing.assert_close(layer(x).double(), expect, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


def test_trainable_heads_freeze_gradients():
    layer = fedlora.RavanLinear(nn.Linear(24, 18), heads=4, rank=3, num_clients=2)
    randomise(layer)
    layer.set_trainable_heads([1, 3], slot=0)
    layer.set_trainable_heads([0], slot=1)
    assert layer.trainable_heads(0) == [1, 3] and layer.trainable_heads(1) == [0]
    layer.set_segments(torch.tensor([0, 5, 10]), torch.tensor([0, 1]))
    layer(torch.randn(10, 24)).square().sum().backward()
    g_H, g_s = layer.lora_H.grad, layer.lora_s.grad
    frozen = layer.head_mask == 0
    assert (g_H[frozen] == 0).all() and (g_s[frozen] == 0).all()
    assert (g_H[~frozen].abs().sum((-1, -2)) > 0).all()
    with pytest.raises(ValueError, match="heads must hold ints in"):
        layer.set_trainable_heads([4])


def test_bf16_base_layer():
    base = nn.Linear(64, 48).to(torch.bfloat16)
    layer = fedlora.RavanLinear(base, heads=2, rank=8)
    randomise(layer)
    assert layer.lora_H.dtype == torch.float32 and layer.lora_A.dtype == torch.bfloat16
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expect = base(x).double() + x.double() @ naive_delta(layer, 0).T
    torch.testing.assert_close(y.double(), expect, atol=5e-2, rtol=5e-2)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"base must be an nn\.Linear"):
        fedlora.RavanLinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="heads must be a positive int"):
        fedlora.RavanLinear(nn.Linear(4, 4), heads=0)
    with pytest.raises(ValueError, match="init must be one of"):
        fedlora.RavanLinear(nn.Linear(4, 4), init="xavier")
    with pytest.raises(ValueError, match="num_clients must be a positive int"):
        fedlora.RavanLinear(nn.Linear(4, 4), num_clients=0)
    layer = fedlora.RavanLinear(nn.Linear(4, 4), heads=2, rank=2)
    with pytest.raises(ValueError, match="slot must be an int in"):
        layer.delta_weight(1)


def test_compile_fullgraph_layer_cpu():
    layer = fedlora.RavanLinear(nn.Linear(24, 18), heads=2, rank=4)
    randomise(layer)
    x = torch.randn(7, 24)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
