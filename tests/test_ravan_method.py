"""Ravan's federated rules: head selection, upload, and the server's per-head aggregation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedlora
from fedlora.methods import ravan


def model(num_clients: int = 1, heads: int = 4, rank: int = 3) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12))
    return fedlora.inject(
        net, "ravan", target_modules=["0", "2"], heads=heads, rank=rank, num_clients=num_clients
    )


def random_state(paths, h=4, r=3, with_s=True):
    state = {}
    for p in paths:
        state[f"{p}.lora_H"] = torch.randn(h, r, r)
        if with_s:
            state[f"{p}.lora_s"] = torch.rand(h) + 0.5
    return state


PATHS = ["0", "2"]


def folded(state, p):
    return state[f"{p}.lora_H"] * state[f"{p}.lora_s"][:, None, None]


def test_all_heads_all_clients_is_exact_weighted_mean_of_delta_w():
    net = model()
    g = random_state(PATHS)
    clients = [random_state(PATHS) for _ in range(3)]
    w = torch.tensor([0.2, 0.5, 0.3])
    new, metrics = ravan.aggregate(g, clients, w, [{}, {}, {}])
    assert metrics["aggregation_error"] < 1e-6
    for path, layer in ravan.ravan_layers(net):
        # ΔW of the new global == Σ p_k ΔW_k, computed densely with the real bases
        def dw(state, path=path, layer=layer):
            layer.load_adapter_state(
                {
                    "lora_H": state[f"{path}.lora_H"],
                    "lora_s": state.get(f"{path}.lora_s", torch.ones(4)),
                }
            )
            return layer.delta_weight().double()

        ideal = sum(wk * dw(c) for wk, c in zip(w.tolist(), clients, strict=True))
        torch.testing.assert_close(dw(new), ideal, atol=1e-5, rtol=1e-5)
        assert torch.equal(new[f"{path}.lora_s"], torch.ones(4))


def test_untrained_head_unchanged_single_contributor_taken_whole():
    g = random_state(PATHS)
    clients = [random_state(PATHS) for _ in range(3)]
    metas = [
        {"heads": {"0": [0, 1], "2": [0]}},
        {"heads": {"0": [1], "2": [0]}},
        {"heads": {"0": [1, 2], "2": [0]}},
    ]
    w = torch.tensor([1.0, 2.0, 3.0])
    new, metrics = ravan.aggregate(g, clients, w, metas)
    H = new["0.lora_H"]
    torch.testing.assert_close(H[0], folded(clients[0], "0")[0])  # lone contributor, taken whole
    expect1 = sum(w[k] * folded(clients[k], "0")[1] for k in range(3)) / w.sum()
    torch.testing.assert_close(H[1], expect1)
    torch.testing.assert_close(H[2], folded(clients[2], "0")[2])
    torch.testing.assert_close(H[3], folded(g, "0")[3])  # nobody trained head 3: s·H of the global
    torch.testing.assert_close(new["2.lora_H"][1:], folded(g, "2")[1:])
    assert metrics["heads_trained"]["0"] == [1, 3, 1, 0]
    assert metrics["aggregation_error"] > 0  # partial training is not Σ p_k ΔW_k


def test_other_keys_are_weighted_averaged():
    g = random_state(PATHS) | {"classifier.weight": torch.randn(3, 5)}
    clients = [random_state(PATHS) | {"classifier.weight": torch.randn(3, 5)} for _ in range(2)]
    new, _ = ravan.aggregate(g, clients, torch.tensor([0.25, 0.75]), [{}, {}])
    torch.testing.assert_close(
        new["classifier.weight"],
        0.25 * clients[0]["classifier.weight"] + 0.75 * clients[1]["classifier.weight"],
    )


def test_select_heads_scores_and_budget():
    net = model(num_clients=2)
    layers = ravan.ravan_layers(net)
    with torch.no_grad():
        layers[0][1].lora_H[0, 2].fill_(5.0)
        layers[0][1].lora_H[0, 0].fill_(1.0)
    sel = ravan.select_heads(net, 2, "weight", slot=0, seed=3)
    assert sel["0"] == [0, 2]
    assert all(len(v) == 2 for v in sel.values())
    assert layers[0][1].trainable_heads(0) == [0, 2]
    # ties (all-zero cores in layer "2") are broken by the seed, not always the first heads
    picks = {tuple(ravan.select_heads(net, 1, "weight", slot=1, seed=s)["2"]) for s in range(12)}
    assert len(picks) > 1
    rnd = ravan.select_heads(net, 3, "random", slot=1, seed=0)
    assert len(rnd["0"]) == 3 and layers[0][1].trainable_heads(1) == rnd["0"]
    with pytest.raises(ValueError, match=r"budget must be an int in \[1, 4\]"):
        ravan.select_heads(net, 5)
    with pytest.raises(ValueError, match="score must be one of"):
        ravan.select_heads(net, 1, "magnitude")


def test_gradient_score_reads_core_gradients():
    net = model()
    with pytest.raises(ValueError, match=r"needs lora_H\.grad"):
        ravan.select_heads(net, 1, "gradient")
    net(torch.randn(8, 20)).square().sum().backward()
    layers = ravan.ravan_layers(net)
    grads = {p: torch.linalg.matrix_norm(layer.lora_H.grad[0]) for p, layer in layers}
    sel = ravan.select_heads(net, 2, "gradient")
    for p, g in grads.items():
        assert sel[p] == sorted(torch.argsort(g, descending=True)[:2].tolist())


def test_client_update_folds_s_and_reports_heads():
    net = model()
    layers = ravan.ravan_layers(net)
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_H.normal_()
            layer.lora_s.uniform_(0.5, 2)
    ravan.select_heads(net, 2, "random", seed=1)
    state, meta = ravan.client_update(net)
    for p, layer in layers:
        expect = layer.lora_H[0].detach() * layer.lora_s[0].detach()[:, None, None]
        torch.testing.assert_close(state[f"{p}.lora_H"], expect)
        assert torch.equal(state[f"{p}.lora_s"], torch.ones(4))
        assert meta["heads"][p] == layer.trainable_heads(0)


def test_through_the_public_aggregate_with_a_nan_client():
    g = random_state(PATHS)
    good = [random_state(PATHS) for _ in range(2)]
    bad = random_state(PATHS)
    bad["0.lora_H"][0, 0, 0] = float("nan")
    new, metrics = fedlora.aggregate("ravan", g, [good[0], bad, good[1]], [1.0, 1.0, 1.0])
    assert all(torch.isfinite(v).all() for v in new.values())
    assert len(metrics["rejected"]) == 1 and "1" in str(metrics["rejected"][0])
    expect = (folded(good[0], "0") + folded(good[1], "0")) / 2
    torch.testing.assert_close(new["0.lora_H"], expect)
