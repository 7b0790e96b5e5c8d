"""FLoRA: stacking aggregation; the clients merge the stack into their frozen base. Exact.

Server: per layer ``B_s = [B_1 … B_K]`` ``[d_out, Σ r_k]`` and ``A_s = [p_1 A_1; …; p_K A_K]``
``[Σ r_k, d_in]``, so ``B_s A_s = Σ p_k B_k A_k`` exactly. The returned state carries, per layer:

- ``<path>.lora_merge_B`` = ``B_s`` and ``<path>.lora_merge_A`` = ``A_s``: each client adds
  ``scale · B_s A_s`` (``scale = alpha / R``, the adapter's own scale) to its frozen base weight;
- a fresh adapter ``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` of the global rank ``R``:
  ``B = 0`` and ``A`` drawn like PEFT's default (Kaiming-uniform, bound ``1/√d_in``) from a CPU
  generator seeded with ``seed`` (vary it per round); ``seed=None`` keeps the global's ``A``.

Client ranks may differ (``r_k ≤ R``): stacking needs no common rank. Other keys are
``p_k``-averaged. ``metas`` are not read. Passing the returned state back as the next round's
``global_state`` is fine: the merge keys are instructions for the clients and are ignored on input.
Not streaming-capable in a bounded memory (the stack grows with the clients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.methods._common import (
    State,
    a_key,
    average_other_keys,
    b_key,
    check_declared_rank,
    lora_paths,
)
from fedlora.methods._protocol import Method


def check_client(global_state: State, state: State, meta: Mapping[str, Any]) -> None:
    """Reject a client whose declared rank disagrees with its uploaded shapes."""
    check_declared_rank(global_state, state, meta)


def aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    metas: Sequence[Mapping[str, Any]],
    *,
    seed: int | None = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FLoRA's server rule: stacked merge factors plus a fresh adapter."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    new_state: dict[str, torch.Tensor] = {}
    merges: dict[str, torch.Tensor] = {}
    for path in lora_paths(global_state):
        A_g, B_g = global_state[a_key(path)], global_state[b_key(path)]
        dtype = torch.promote_types(A_g.dtype, torch.float32)
        merges[path + ".lora_merge_B"] = torch.cat(
            [cs[b_key(path)].to(dtype) for cs in client_states], dim=1
        )
        merges[path + ".lora_merge_A"] = torch.cat(
            [
                cs[a_key(path)].to(dtype) * float(w)
                for cs, w in zip(client_states, weights, strict=True)
            ],
            dim=0,
        )
        if gen is None:
            new_state[a_key(path)] = A_g.clone()
        else:
            bound = 1.0 / A_g.shape[1] ** 0.5
            draw = torch.rand(A_g.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound
            new_state[a_key(path)] = draw.to(device=A_g.device, dtype=A_g.dtype)
        new_state[b_key(path)] = torch.zeros_like(B_g)
    average_other_keys(new_state, global_state, client_states, weights)
    out = {k: new_state[k] for k in global_state}
    out.update(merges)
    return out, {}


def _round_options(round_seed: int) -> dict[str, Any]:
    """The seed of the fresh adapter the clients restart from after each merge."""
    return {"seed": round_seed}


METHOD = Method(
    name="flora",
    layer="lora",
    ranks="prefix",
    aggregate=aggregate,
    check_client=check_client,
    changes_base=True,
    linear=True,
    round_options=_round_options,
    summary="FLoRA: stack every client's factors, merge into the base, restart the adapter",
)
