"""PreLort: prefix-nested ranks, segment-wise aggregation.

Client side: client ``k`` downloads the rank prefix ``A[:r_k]``, ``B[:, :r_k]``
(:func:`fedlora.methods.prefix.truncate`), trains with the nested loss
``mean_{t∈T_k} ℓ(adapter truncated to t)`` where ``T_k`` = the distinct client ranks ``≤ r_k``
plus ``r_k`` (:func:`truncation_set`), and uploads its prefix. The loss is computed in ONE
forward/backward: the batch is repeated ``|T_k|`` times, each copy is its own segment using the
client's slot with a prefix-``t`` rank mask (:func:`nested_segments`), and the per-copy mean
losses are averaged. The sampled variant draws one ``t`` per step instead
(:func:`sample_truncation`).

Server, segment-wise: per rank index ``j``, the ``p_k``-weighted mean over the clients with
``r_k > j`` (the segments between consecutive distinct ranks share one set of contributors); an
index no client covers keeps the global's value. A lone contributor of an index is taken whole (no
zero-padding shrinkage); with equal ranks this is FedIT. One
:func:`fedlora_kernels.masked_weighted_mean` per factor reads every client's prefix in place.
Other keys are ``p_k``-averaged. ``metas[k]`` may declare ``{"rank": r_k}`` (or
``{"rank": {path: r_k}}``), checked against the uploaded shapes. Streaming-capable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
from fedlora.methods._protocol import Budget, Method
from fedlora.methods.hetlora import PrefixClient


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


# ------------------------------------------------------------------------------------------------
# client side
# ------------------------------------------------------------------------------------------------


def truncation_set(rank: int, client_ranks: Iterable[int]) -> list[int]:
    """``T_k``: the distinct ranks of ``client_ranks`` that are ``≤ rank``, plus ``rank``, sorted."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    ranks = sorted({int(r) for r in client_ranks if 1 <= int(r) <= rank} | {rank})
    return ranks


def sample_truncation(truncations: Sequence[int], generator: torch.Generator) -> int:
    """One ``t`` drawn uniformly from ``truncations`` (the sampled variant)."""
    if not truncations:
        raise ValueError("truncations must not be empty")
    i = int(torch.randint(len(truncations), (1,), generator=generator))
    return int(truncations[i])


def nested_segments(
    rows_per_copy: Sequence[int],
    slots: Sequence[int],
    truncations: Sequence[Sequence[int]],
    global_rank: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Segments for nested training of several clients in one pass.

    Client ``i`` (``rows_per_copy[i]`` rows, slot ``slots[i]``) contributes one copy of its
    batch per truncation in ``truncations[i]``. Returns ``seg_offsets`` ``[S+1]``,
    ``seg_adapter`` ``[S]``, ``rank_mask`` ``[S, global_rank]`` (bool prefix masks) and, per segment,
    ``(client index, truncation)``. The caller lays the batch copies out in that order.
    """
    if not (len(rows_per_copy) == len(slots) == len(truncations)):
        raise ValueError("rows_per_copy, slots and truncations must have one entry per client")
    offsets, adapter, masks, owners = [0], [], [], []
    for i, (rows, slot, ts) in enumerate(zip(rows_per_copy, slots, truncations, strict=True)):
        if not ts:
            raise ValueError(f"truncations[{i}] is empty: a client needs at least one rank")
        for t in ts:
            if not 1 <= t <= global_rank:
                raise ValueError(f"truncation {t} of client {i} is outside [1, {global_rank}]")
            offsets.append(offsets[-1] + rows)
            adapter.append(slot)
            m = torch.zeros(global_rank, dtype=torch.bool)
            m[:t] = True
            masks.append(m)
            owners.append((i, t))
    return (
        torch.tensor(offsets, dtype=torch.long),
        torch.tensor(adapter, dtype=torch.long),
        torch.stack(masks),
        owners,
    )


class PreLortClient(PrefixClient):
    """PreLort client: prefix download and upload, trained under the nested truncations
    ``T_k`` (the distinct client ranks ``≤ r_k`` plus ``r_k``) in one pass."""

    def truncations(self, budget: Budget) -> list[int]:
        return truncation_set(budget.rank, [b.rank for b in self.budgets])


METHOD = Method(
    name="prelort",
    layer="lora",
    ranks="prefix",
    aggregate=aggregate,
    client=PreLortClient,
    check_client=check_client,
    stream_add=stream_add,
    stream_result=stream_result,
    budget_fields=("rank", "steps"),
    summary="PreLort: prefix-nested ranks, nested-truncation loss, segment-wise average",
)
