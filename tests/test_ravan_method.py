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
    state, meta = ravan.client_update(net)  # compact: the trained heads only, s folded in
    full, full_meta = ravan.client_update(net, compact=False)
    assert meta == full_meta
    for p, layer in layers:
        expect = layer.lora_H[0].detach() * layer.lora_s[0].detach()[:, None, None]
        heads = layer.trainable_heads(0)
        assert meta["heads"][p] == heads and len(heads) == 2
        torch.testing.assert_close(state[f"{p}.lora_H"], expect[heads])
        assert f"{p}.lora_s" not in state
        torch.testing.assert_close(full[f"{p}.lora_H"], expect)
        assert torch.equal(full[f"{p}.lora_s"], torch.ones(4))


def _trained_net(num_heads: int, seed: int):
    net = model()
    with torch.no_grad():
        for _, layer in ravan.ravan_layers(net):
            layer.lora_H.normal_()
            layer.lora_s.uniform_(0.5, 2)
    ravan.select_heads(net, num_heads, "random", seed=seed)
    return net


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_upload_bytes_shrink_with_the_head_budget(num_heads):
    """DESIGN §4: only s·H of the trained heads travel. Full cores: h·r² + h floats per layer;
    compact: K·r² (K of h heads), plus K indices in the meta."""
    from fedlora.methods.prefix import nbytes

    net = _trained_net(num_heads, seed=0)
    compact, meta = ravan.client_update(net)
    full, _ = ravan.client_update(net, compact=False)
    h, r = 4, 3
    assert nbytes(full) == len(PATHS) * (h * r * r + h) * 4  # what every client sent before
    assert nbytes(compact) == len(PATHS) * num_heads * r * r * 4
    g = ravan.client_update(model(), compact=False)[0]
    _, m_c = fedlora.aggregate("ravan", g, [compact], [1.0], [meta])
    _, m_f = fedlora.aggregate("ravan", g, [full], [1.0], [meta])
    assert m_c["rejected"] == [] == m_f["rejected"]
    meta_bytes = len(PATHS) * num_heads * 8  # the head indices (8 bytes per number)
    assert m_c["bytes_uploaded"] == nbytes(compact) + meta_bytes
    assert m_f["bytes_uploaded"] == nbytes(full) + meta_bytes
    if num_heads == 1:  # 1 of 4 heads: about a quarter of the full cores
        assert m_c["bytes_uploaded"] / m_f["bytes_uploaded"] < 0.3


def test_compact_and_full_uploads_aggregate_identically():
    g = random_state(PATHS)
    nets = [_trained_net(k, seed=k) for k in (1, 2, 3, 4)]
    compact = [ravan.client_update(n) for n in nets]
    full = [ravan.client_update(n, compact=False) for n in nets]
    w = [1.0, 2.0, 3.0, 0.5]
    new_c, m_c = fedlora.aggregate("ravan", g, [s for s, _ in compact], w, [m for _, m in compact])
    new_f, m_f = fedlora.aggregate("ravan", g, [s for s, _ in full], w, [m for _, m in full])
    # mixed: some clients compact, some full
    mixed = [compact[0], full[1], compact[2], full[3]]
    new_m, _ = fedlora.aggregate("ravan", g, [s for s, _ in mixed], w, [m for _, m in mixed])
    assert m_c["rejected"] == [] == m_f["rejected"]
    assert new_c.keys() == new_f.keys() == g.keys()
    for k in g:
        assert torch.equal(new_c[k], new_f[k]) and torch.equal(new_m[k], new_f[k]), k
    assert m_c["aggregation_error"] == pytest.approx(m_f["aggregation_error"], rel=1e-6)
    assert m_c["heads_trained"] == m_f["heads_trained"]
    assert m_c["bytes_uploaded"] < m_f["bytes_uploaded"]


def _compact_client():
    state, meta = ravan.client_update(_trained_net(2, seed=3))
    return state, meta


@pytest.mark.parametrize(
    "corrupt,key,words",
    [
        (lambda s, m: m.pop("heads"), "0.lora_H", "needs meta 'heads'"),
        (lambda s, m: m["heads"].pop("2"), "2.lora_H", "needs meta 'heads'"),
        (lambda s, m: m["heads"].__setitem__("0", [1]), "0.lora_H", "lists 1 heads"),
        (lambda s, m: m["heads"].__setitem__("0", [1, 1]), "0.lora_H", "repeated"),
        (lambda s, m: m["heads"].__setitem__("0", [0, 4]), "0.lora_H", "in [0, 4)"),
        (lambda s, m: s.__setitem__("0.lora_s", torch.ones(3)), "0.lora_s", "one per uploaded"),
        (lambda s, m: s.__setitem__("0.lora_H", torch.randn(2, 3, 4)), "0.lora_H", "shape"),
        (lambda s, m: s.__setitem__("0.lora_H", torch.randn(5, 3, 3)), "0.lora_H", "shape"),
        (lambda s, m: s.__setitem__("0.lora_H", torch.randn(2, 9)), "0.lora_H", "shape"),
    ],
    ids=["no_heads", "layer_missing", "count", "repeated", "range", "s_len", "r", "K>h", "dim"],
)
def test_bad_compact_uploads_are_rejected_and_named(corrupt, key, words):
    g = random_state(PATHS)
    good = _compact_client()
    state, meta = _compact_client()
    meta = {"heads": dict(meta["heads"])}
    corrupt(state, meta)
    _, metrics = fedlora.aggregate("ravan", g, [good[0], state], [1.0, 1.0], [good[1], meta])
    assert [r["client"] for r in metrics["rejected"]] == [1], metrics["rejected"]
    rejected = metrics["rejected"][0]
    assert words in rejected["reason"], rejected
    if rejected["key"] is not None:
        assert rejected["key"] == key
    with pytest.raises(ValueError, match="client_states\\[1\\] rejected"):
        fedlora.aggregate("ravan", g, [good[0], state], [1.0, 1.0], [good[1], meta], strict=True)


def test_step_size_does_not_depend_on_rank_or_heads():
    """DESIGN §4: Ravan's layers use scale 1 whatever --rank / --heads (LoRA's alpha/r would
    halve the step at twice the rank). One Adam step from H = 0 moves every trainable core
    element by lr, so with orthonormal bases ‖ΔW‖_F = lr·r·√K at every rank: the update per
    element of ΔW's span is the same."""
    from fedlora.methods import ClientOptions
    from fedlora.simulate.optim import SlotAdamW

    for rank, heads in ((2, 2), (4, 4), (8, 2)):
        rule = ravan.METHOD.client(ClientOptions(rank=rank, heads=heads, alpha=16.0), [])
        assert rule.layer_options()["scale"] == 1.0
        torch.manual_seed(0)
        net = fedlora.inject(
            nn.Sequential(nn.Linear(32, 32)), "ravan", target_modules=["0"], **rule.layer_options()
        )
        layer = net[0]
        assert layer.scale == 1.0
        opt = SlotAdamW(net, lr=1e-3)
        net(torch.randn(16, 32)).square().sum().backward()
        opt.step(torch.ones(1, dtype=torch.bool))
        dw = layer.delta_weight()
        expect = 1e-3 * rank * heads**0.5  # every element of H moved by lr (Adam's first step)
        assert float(dw.norm()) == pytest.approx(expect, rel=0.05), (rank, heads)


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
