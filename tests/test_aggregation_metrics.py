"""The factored aggregation error (fedlora.metrics) and the server rules on a real model's layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fedlora
from fedlora.aggregation import aggregate
from fedlora.metrics import aggregation_error, error_parts, factored_sq_norm, relative_error


def terms(d_out, d_in, ranks, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g), float(c))
        for r, c in zip(ranks, torch.rand(len(ranks), generator=g) + 0.1, strict=True)
    ]


def dense_sum(ts):
    return sum(c * B.double() @ A.double() for B, A, c in ts)


@pytest.mark.parametrize(
    "d_out,d_in,ideal_ranks,global_ranks",
    [
        (41, 37, [3, 5, 2], [4]),  # thin stacks: Gram route
        (6, 5, [4, 4, 4, 4], [5, 3]),  # stack wider than the layer: dense route
        (1, 9, [1], [1, 2]),
    ],
)
def test_error_parts_match_dense(d_out, d_in, ideal_ranks, global_ranks):
    ideal = terms(d_out, d_in, ideal_ranks, 0)
    glob = terms(d_out, d_in, global_ranks, 1)
    diff, ref = error_parts(ideal, glob)
    exp_diff = float((dense_sum(ideal) - dense_sum(glob)).square().sum())
    exp_ref = float(dense_sum(ideal).square().sum())
    assert diff == pytest.approx(exp_diff, rel=1e-9)
    assert ref == pytest.approx(exp_ref, rel=1e-9)
    assert aggregation_error(ideal, glob) == pytest.approx(math.sqrt(exp_diff / exp_ref), rel=1e-9)
    assert factored_sq_norm(glob) == pytest.approx(float(dense_sum(glob).square().sum()), rel=1e-9)


def test_error_of_an_exact_rewrite_is_zero():
    ideal = terms(30, 20, [2, 3, 4], 2)
    # the same matrix as one stacked term: B_s = [c_k B_k], A_s = [A_k]
    B_s = torch.cat([c * B for B, _, c in ideal], dim=1)
    A_s = torch.cat([A for _, A, _ in ideal], dim=0)
    assert aggregation_error(ideal, [(B_s, A_s, 1.0)]) < 1e-7


def test_relative_error_edges_and_bad_terms():
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(1.0, 0.0) == math.inf
    assert relative_error(4.0, 16.0) == 0.5
    B, A = torch.randn(4, 2), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"ideal\[0\] must hold B"):
        error_parts([(B, torch.randn(3, 3), 1.0)], [])
    with pytest.raises(TypeError, match=r"global_\[0\] must be a \(B, A, coefficient\)"):
        error_parts([(B, A, 1.0)], [(B, A)])
    with pytest.raises(ValueError, match="one layer"):
        error_parts([(B, A, 1.0)], [(torch.randn(5, 2), A, 1.0)])


# ------------------------------------------------------------------------ on a real model


def lora_model(method: str, rank: int = 3) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 7))
    return fedlora.inject(net, method, target_modules=["0", "2"], rank=rank, alpha=6.0)


def trained(state: dict, seed: int, rank: int | None = None) -> dict:
    """A client's state after 'training': the global perturbed (B moves off zero)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    if rank is not None:
        out = {
            k: (v[:rank] if k.endswith("lora_A.weight") else v[:, :rank]) for k, v in out.items()
        }
    return out


@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_folding_the_returned_merge_into_the_base_is_exact_on_a_model(method):
    net = lora_model(method)
    g = fedlora.get_adapter_state_dict(net)
    clients = [trained(g, s) for s in range(3)]
    w = [5.0, 1.0, 2.0]
    p = [x / sum(w) for x in w]
    layers = dict(fedlora.adapter_layers(net))
    ideal = {}
    for path, layer in layers.items():
        ideal[path] = sum(
            pk * layer.scale * c[f"{path}.lora_B.weight"] @ c[f"{path}.lora_A.weight"]
            for c, pk in zip(clients, p, strict=True)
        )
    new, m = aggregate(method, g, clients, w, error=True)
    assert m["aggregation_error"] < 1e-6
    kind = "merge" if method == "flora" else "residual"
    adapter = {
        k: v for k, v in new.items() if ".lora_merge_" not in k and ".lora_residual_" not in k
    }
    fedlora.set_adapter_state_dict(net, adapter)
    for path, layer in layers.items():
        fold = layer.scale * new[f"{path}.lora_{kind}_B"] @ new[f"{path}.lora_{kind}_A"]
        effective = fold + layer.delta_weight()
        torch.testing.assert_close(effective, ideal[path], atol=1e-5, rtol=1e-5)


def test_prefix_methods_on_a_model_load_back_and_match_the_rule():
    net = lora_model("prelort", rank=4)
    g = fedlora.get_adapter_state_dict(net)
    ranks = [4, 2, 3]
    clients = [trained(g, s, r) for s, r in enumerate(ranks)]
    new, m = aggregate(
        "prelort", g, clients, [1.0, 1.0, 2.0], [{"rank": r} for r in ranks], error=True
    )
    assert m["rejected"] == []
    fedlora.set_adapter_state_dict(net, new)
    for path, layer in fedlora.adapter_layers(net):
        A = new[f"{path}.lora_A.weight"]
        exp3 = clients[0][f"{path}.lora_A.weight"][3]  # only the rank-4 client holds index 3
        torch.testing.assert_close(A[3], exp3)
        torch.testing.assert_close(layer.lora_A[0].detach(), A)
