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

Ablations (method options, issue 21): ``--prelort-aggregation zeropad`` averages the same
uploads zero-padded (index ``j`` gets ``Σ_{k: r_k > j} p_k X_k[j]``: HetLoRA's rule with data
weights) instead of segment-wise; ``--prelort-training nested`` (default: every ``t ∈ T_k`` each
step), ``sampled`` (one ``t`` per step drawn uniformly from ``T_k`` by :func:`sample_truncation`
with ``torch.Generator().manual_seed(seed)``, ``seed`` the client's round seed that
:meth:`PreLortClient.prepare` receives) or ``flat`` (``r_k`` only, as HetLoRA's clients);
``--prelort-truncations 2,4`` replaces the client ranks in ``T_k`` (``T_k`` = those ``< r_k``
plus ``r_k``). Every round's ``metrics["segment_norms"]`` holds ``‖ΔW‖_F`` of each rank segment
of the new global (:func:`fedlora.methods.prefix.segment_norms`).
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
from fedlora.methods._protocol import Budget, Method, Option
from fedlora.methods.hetlora import PrefixClient

AGGREGATIONS = ("segment", "zeropad")
TRAININGS = ("nested", "sampled", "flat")

OPTIONS = (
    Option("prelort_aggregation", "str", "segment", "PreLort: segment-wise average over the "
           "clients holding each rank index, or the zero-padded contrast",
           choices=AGGREGATIONS, server="aggregation"),
    Option("prelort_training", "str", "nested", "PreLort: every truncation of T_k each step "
           "(nested), one drawn per step (sampled) or the client's own rank only (flat)",
           choices=TRAININGS),
    Option("prelort_truncations", "ints", (), "PreLort: the truncation set T (comma list; "
           "default: the distinct client ranks); client k trains those below r_k and r_k",
           low=1, high=10**6),
)  # fmt: skip


def check_options(values: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """A truncation set means nothing to flat training (it trains ``r_k`` alone)."""
    if values["prelort_training"] == "flat" and values["prelort_truncations"]:
        raise ValueError(
            "--prelort-truncations: --prelort-training flat trains each client's own rank only; "
            "leave the truncation set out or train nested/sampled"
        )


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def check_client(global_state: State, state: State, meta: Mapping[str, Any]) -> None:
    """Reject a client whose declared rank disagrees with its uploaded shapes."""
    check_declared_rank(global_state, state, meta)


def aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    metas: Sequence[Mapping[str, Any]],
    *,
    aggregation: str = "segment",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PreLort's segment-wise server rule (``aggregation="zeropad"``: the zero-padded
    contrast); see the module docstring."""
    _check_aggregation(aggregation)
    new_state: dict[str, torch.Tensor] = {}
    coverage: dict[str, list[int]] = {}
    all_ranks: set[int] = set()
    for path in lora_paths(global_state):
        ranks = [rank_of(cs, path) for cs in client_states]
        all_ranks.update(ranks)
        full = rank_of(global_state, path)
        for key, dim in ((a_key(path), 0), (b_key(path), 1)):
            g = global_state[key]
            tensors = [cs[key] for cs in client_states]
            if aggregation == "segment":
                new_state[key] = masked_mean(tensors, weights, rank_dim=dim, fallback=g)
                continue
            mean = masked_mean(tensors, weights, rank_dim=dim, fallback=torch.zeros_like(g))
            held = torch.zeros(full, dtype=torch.float32, device=g.device)
            for r, w in zip(ranks, weights, strict=True):
                held[:r] += w
            view = [1, 1]
            view[dim] = full
            new_state[key] = (mean.float() * (held / sum(weights)).view(view)).to(g.dtype)
        coverage[path] = [sum(r > j for r in ranks) for j in range(full)]
    average_other_keys(new_state, global_state, client_states, weights)
    out = {k: new_state[k] for k in global_state}
    return out, {"prelort_coverage": coverage, "segment_norms": _segment_norms(out, all_ranks)}


def _segment_norms(state: dict[str, torch.Tensor], client_ranks: set[int]) -> dict[str, float]:
    from fedlora.methods.prefix import segment_bounds, segment_norms

    paths = lora_paths(state)
    if not paths:
        return {}
    return segment_norms(state, segment_bounds(rank_of(state, paths[0]), client_ranks))


def stream_add(
    acc: MaskedAccumulator,
    state: State,
    weight: float,
    meta: Mapping[str, Any],
    *,
    aggregation: str = "segment",
) -> None:
    """Add one client's prefixes (and other keys) to the running sums."""
    _check_aggregation(aggregation)
    for path in lora_paths(acc.global_state):
        acc.add(a_key(path), state[a_key(path)], weight, rank_dim=0)
        acc.add(b_key(path), state[b_key(path)], weight, rank_dim=1)
    acc.add_full(other_keys(acc.global_state), state, weight)


def stream_result(
    acc: MaskedAccumulator, *, aggregation: str = "segment"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per rank index means over the covering clients; uncovered indices unchanged (zero-padded
    sums with ``aggregation="zeropad"``)."""
    out = {}
    g = acc.global_state
    for path in lora_paths(g):
        for key, dim in ((a_key(path), 0), (b_key(path), 1)):
            if aggregation == "zeropad":
                out[key] = acc.zero_padded(key, rank_dim=dim).to(g[key].dtype)
            else:
                out[key] = acc.mean(key, rank_dim=dim)
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
    ``T_k`` (the distinct client ranks ``≤ r_k`` plus ``r_k``, or ``--prelort-truncations``) in
    one pass; ``sampled`` training draws one ``t ∈ T_k`` per step, ``flat`` trains ``r_k``."""

    OPTIONS = OPTIONS

    def __init__(self, options: Any, budgets: Sequence[Budget]) -> None:
        super().__init__(options, budgets)
        #: per client (its Budget object, as the simulator hands the same one every round):
        #: the generator of its sampled truncations, seeded by :meth:`prepare`
        self._draws: dict[int, torch.Generator] = {}

    def truncation_set(self, budget: Budget) -> list[int]:
        """``T_k`` of a client of ``budget``."""
        given = self.option("prelort_truncations")
        pool = given if given else [b.rank for b in self.budgets]
        return truncation_set(budget.rank, [t for t in pool if t < budget.rank])

    def prepare(self, model: Any, slot: int, state: State, budget: Budget, seed: int) -> None:
        super().prepare(model, slot, state, budget, seed)
        self._draws[id(budget)] = torch.Generator().manual_seed(int(seed))

    def truncations(self, budget: Budget) -> list[int] | None:
        training = self.option("prelort_training")
        if training == "flat":
            return None
        ts = self.truncation_set(budget)
        if training == "nested":
            return ts
        gen = self._draws.setdefault(id(budget), torch.Generator().manual_seed(0))
        return [sample_truncation(ts, gen)]

    def passes(self, budget: Budget) -> int:
        """Forward/backward passes of one batch per round (no draw is consumed)."""
        nested = self.option("prelort_training") == "nested"
        return budget.steps * (len(self.truncation_set(budget)) if nested else 1)


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
    options=OPTIONS,
    check_options=check_options,
    logged=("segment_norms",),
)
