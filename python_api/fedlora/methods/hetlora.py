"""HetLoRA (zero-padding baseline): heterogeneous client ranks, zero-padded averaging.

Global rank ``R``; client ``k`` trains the rank prefix ``r_k ≤ R`` (``A[:r_k]``, ``B[:, :r_k]``)
and uploads it. The server zero-pads every client to ``R`` and averages:
``A_g[j] = Σ_{k: r_k > j} w_k A_k[j] / Σ_k w_k`` (the same for the columns of ``B``), so a
component held by few clients is shrunk by the weight of the others, and a component no client
holds becomes 0. Weights per layer (``weighting=``):

- ``"sparsity"`` (default, the HetLoRA paper): ``w_k ∝ ‖B_k A_k‖_F`` of that layer (from factors);
  if every client's product is 0 in a layer, the data weights ``p_k`` are used there;
- ``"data"``: ``w_k = p_k``.

Other keys are ``p_k``-averaged. ``metas[k]`` may declare ``{"rank": r_k}`` (or
``{"rank": {path: r_k}}``); a declared rank that disagrees with the uploaded shapes rejects the
client. Client side: :func:`fedlora.methods.prefix.truncate` (the rank-``r_k`` prefix of the
global). Streaming-capable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedlora.methods._common import (
    MaskedAccumulator,
    State,
    a_key,
    average_other_keys,
    b_key,
    check_declared_rank,
    factors,
    lora_paths,
    masked_mean,
    normalised,
    other_keys,
    sparsity_weight,
)
from fedlora.methods._protocol import Budget, Client, Method

WEIGHTINGS = ("sparsity", "data")


def check_client(global_state: State, state: State, meta: Mapping[str, Any]) -> None:
    """Reject a client whose declared rank disagrees with its uploaded shapes."""
    check_declared_rank(global_state, state, meta)


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def _layer_weights(
    client_states: Sequence[State], weights: Sequence[float], path: str, weighting: str
) -> list[float]:
    if weighting == "data":
        return normalised(weights)
    norms = [sparsity_weight(*factors(cs, path)) for cs in client_states]
    return normalised(norms) if any(norms) else normalised(weights)


def aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    metas: Sequence[Mapping[str, Any]],
    *,
    weighting: str = "sparsity",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HetLoRA's server rule (zero-padded weighted average); see the module docstring."""
    _check_weighting(weighting)
    new_state: dict[str, torch.Tensor] = {}
    layer_weights: dict[str, list[float]] = {}
    for path in lora_paths(global_state):
        w = _layer_weights(client_states, weights, path, weighting)
        total = sum(w)  # 1 up to rounding: the weights come normalised
        layer_weights[path] = list(w)
        for key, dim in ((a_key(path), 0), (b_key(path), 1)):
            g = global_state[key]
            rank = g.shape[dim]
            tensors = [cs[key] for cs in client_states]
            # masked mean over the holders of each index, rescaled to a zero-padded mean
            mean = masked_mean(tensors, w, rank_dim=dim, fallback=torch.zeros_like(g))
            held = torch.zeros(rank, dtype=torch.float32, device=g.device)
            for t, wk in zip(tensors, w, strict=True):
                held[: t.shape[dim]] += wk
            shape = [1, 1]
            shape[dim] = rank
            new_state[key] = (mean.float() * (held / total).view(shape)).to(g.dtype)
    average_other_keys(new_state, global_state, client_states, weights)
    return {k: new_state[k] for k in global_state}, {"hetlora_weights": layer_weights}


def stream_add(
    acc: MaskedAccumulator,
    state: State,
    weight: float,
    meta: Mapping[str, Any],
    *,
    weighting: str = "sparsity",
) -> None:
    """Add one client: zero-padded running sums with its per-layer weight."""
    _check_weighting(weighting)
    for path in lora_paths(acc.global_state):
        w = weight if weighting == "data" else sparsity_weight(*factors(state, path))
        # the data weight is kept aside for layers where every sparsity weight turns out 0
        acc.add(a_key(path), state[a_key(path)], w, rank_dim=0)
        acc.add(b_key(path), state[b_key(path)], w, rank_dim=1)
        if weighting == "sparsity":
            g = acc.global_state
            acc.add(a_key(path) + "#data", state[a_key(path)], weight, like=g[a_key(path)])
            acc.add(
                b_key(path) + "#data", state[b_key(path)], weight, rank_dim=1, like=g[b_key(path)]
            )
    acc.add_full(other_keys(acc.global_state), state, weight)


def stream_result(
    acc: MaskedAccumulator, *, weighting: str = "sparsity"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Zero-padded means of the layers, weighted means of the other keys."""
    out = {}
    for path in lora_paths(acc.global_state):
        for key, dim in ((a_key(path), 0), (b_key(path), 1)):
            if acc.total.get(key, 0.0) <= 0 and key + "#data" in acc.avg:
                out[key] = acc.zero_padded(key + "#data", rank_dim=dim)
                out[key] = out[key].to(acc.global_state[key].dtype)
            else:
                out[key] = acc.zero_padded(key, rank_dim=dim)
    for key in other_keys(acc.global_state):
        out[key] = acc.mean(key)
    return {k: out[k] for k in acc.global_state}, {}


class PrefixClient(Client):
    """Client of a prefix-rank method (HetLoRA, and the base of FlexLoRA's and PreLort's):
    client ``k`` receives the rank-``r_k`` prefix ``A[:r_k]``, ``B[:, :r_k]``, trains it and
    uploads it with ``{"rank": r_k}``."""

    def download(self, global_state: State, budget: Budget) -> dict[str, torch.Tensor]:
        from fedlora.methods import prefix

        return prefix.truncate(dict(global_state), budget.rank)

    def upload(
        self, model: nn.Module, slot: int, budget: Budget
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from fedlora.methods import prefix

        state, _ = super().upload(model, slot, budget)
        return prefix.truncate(state, budget.rank), {"rank": budget.rank}


METHOD = Method(
    name="hetlora",
    layer="lora",
    ranks="prefix",
    aggregate=aggregate,
    client=PrefixClient,
    check_client=check_client,
    stream_add=stream_add,
    stream_result=stream_result,
    budget_fields=("rank", "steps"),
    summary="HetLoRA baseline: rank prefixes, zero-padded sparsity-weighted average",
)
