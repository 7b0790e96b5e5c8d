"""PreLort: prefix-nested ranks, segment-wise aggregation.

Client side: client ``k`` downloads the rank prefix ``A[:r_k]``, ``B[:, :r_k]``
(:func:`fedlora.methods.prefix.truncate`), trains with the nested loss
``mean_{t∈T_k} ℓ(adapter truncated to t)`` where ``T_k`` = the distinct client ranks ``≤ r_k``
plus ``r_k`` (:mod:`fedlora.methods.prelort_client`), and uploads its prefix.

Server, segment-wise: per rank index ``j``, the ``p_k``-weighted mean over the clients with
``r_k > j`` (the segments between consecutive distinct ranks share one set of contributors); an
index no client covers keeps the global's value. A lone contributor of an index is taken whole (no
zero-padding shrinkage); with equal ranks this is FedIT. One
:func:`fedlora_kernels.masked_weighted_mean` per factor reads every client's prefix in place.
Other keys are ``p_k``-averaged. ``metas[k]`` may declare ``{"rank": r_k}`` (or
``{"rank": {path: r_k}}``), checked against the uploaded shapes. Streaming-capable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.methods._common import (
    MaskedAccumulator,
    State,
    a_key,
    average_other_keys,
    b_key,
    check_declared_rank,
    lora_paths,
    masked_mean,
    other_keys,
    rank_of,
)

RANKS = "prefix"


def check_client(global_state: State, state: State, meta: Mapping[str, Any]) -> None:
    """Reject a client whose declared rank disagrees with its uploaded shapes."""
    check_declared_rank(global_state, state, meta)


def aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    metas: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PreLort's segment-wise server rule; see the module docstring."""
    new_state: dict[str, torch.Tensor] = {}
    coverage: dict[str, list[int]] = {}
    for path in lora_paths(global_state):
        for key, dim in ((a_key(path), 0), (b_key(path), 1)):
            new_state[key] = masked_mean(
                [cs[key] for cs in client_states], weights, rank_dim=dim, fallback=global_state[key]
            )
        ranks = [rank_of(cs, path) for cs in client_states]
        coverage[path] = [sum(r > j for r in ranks) for j in range(rank_of(global_state, path))]
    average_other_keys(new_state, global_state, client_states, weights)
    return {k: new_state[k] for k in global_state}, {"prelort_coverage": coverage}


def stream_add(
    acc: MaskedAccumulator, state: State, weight: float, meta: Mapping[str, Any]
) -> None:
    """Add one client's prefixes (and other keys) to the running sums."""
    for path in lora_paths(acc.global_state):
        acc.add(a_key(path), state[a_key(path)], weight, rank_dim=0)
        acc.add(b_key(path), state[b_key(path)], weight, rank_dim=1)
    acc.add_full(other_keys(acc.global_state), state, weight)


def stream_result(acc: MaskedAccumulator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per rank index means over the covering clients; uncovered indices unchanged."""
    out = {}
    for path in lora_paths(acc.global_state):
        out[a_key(path)] = acc.mean(a_key(path), rank_dim=0)
        out[b_key(path)] = acc.mean(b_key(path), rank_dim=1)
    for key in other_keys(acc.global_state):
        out[key] = acc.mean(key)
    return {k: out[k] for k in acc.global_state}, {}
