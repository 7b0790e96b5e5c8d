"""PreLort client side: prefix-nested ranks trained with a nested-truncation loss.

Client ``k`` of rank ``r_k`` downloads the prefix ``A[:r_k]``, ``B[:, :r_k]``
(:func:`fedlora.methods.prefix.truncate`) and trains with the nested loss
``mean_{t∈T_k} ℓ(adapter truncated to t)``, where ``T_k`` holds the distinct client ranks
``≤ r_k`` plus ``r_k`` (:func:`truncation_set`). The loss is computed in ONE forward/backward:
the batch is repeated ``|T_k|`` times, each copy is its own segment using the client's slot with
a prefix-``t`` rank mask (:func:`nested_segments`), and the per-copy mean losses are averaged.
The sampled variant draws one ``t`` per step instead (:func:`sample_truncation`). The upload is
the rank-``r_k`` prefix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


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
