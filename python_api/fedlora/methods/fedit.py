"""FedIT (baseline): average every tensor, ``A_g = Σ p_k A_k``, ``B_g = Σ p_k B_k``.

Inexact: ``B_g A_g ≠ Σ p_k B_k A_k`` in general (the aggregation error measures the gap). Clients
hold the global rank; ``metas`` are not read. Streaming-capable (exact running sums).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.methods._common import MaskedAccumulator, State, weighted_average
from fedlora.methods._protocol import Method


def aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    metas: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FedIT's server rule: the ``p_k``-weighted mean of every key."""
    return weighted_average(client_states, weights, list(global_state), global_state), {}


def stream_add(
    acc: MaskedAccumulator, state: State, weight: float, meta: Mapping[str, Any]
) -> None:
    """Add one client to the running sums."""
    acc.add_full(list(acc.global_state), state, weight)


def stream_result(acc: MaskedAccumulator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weighted mean of everything added so far."""
    return {key: acc.mean(key) for key in acc.global_state}, {}


METHOD = Method(
    name="fedit",
    layer="lora",
    ranks="equal",
    aggregate=aggregate,
    stream_add=stream_add,
    stream_result=stream_result,
    linear=True,  # every uploaded value enters the result linearly: NaN/inf checked on it
    summary="FedIT baseline: average A and B (inexact)",
)
