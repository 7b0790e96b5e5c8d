"""FedEx-LoRA: average the factors and fold the residual into the frozen base. Exact.

Server: ``A_g = Σ p_k A_k``, ``B_g = Σ p_k B_k`` (as FedIT) and the residual
``Σ p_k B_k A_k − B_g A_g`` in factored form, per layer:

- ``<path>.lora_residual_B`` = ``[B_1 … B_K, B_g]`` ``[d_out, (K+1)R]``,
- ``<path>.lora_residual_A`` = ``[p_1 A_1; …; p_K A_K; −A_g]`` ``[(K+1)R, d_in]``,

so ``residual_B @ residual_A`` is the residual exactly and no ``[d_out, d_in]`` matrix is formed.
Each client adds ``scale · residual_B @ residual_A`` (``scale = alpha / R``) to its frozen base
weight and continues from ``A_g``, ``B_g``. Clients hold the global rank; ``metas`` are not read.
The residual keys are ignored when the returned state is passed back as ``global_state``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.methods._common import State, a_key, b_key, lora_paths, weighted_average
from fedlora.methods._protocol import Method


def aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    metas: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FedEx-LoRA's server rule: averages plus the residual's stacked factors."""
    new_state = weighted_average(client_states, weights, list(global_state), global_state)
    for path in lora_paths(global_state):
        A_new, B_new = new_state[a_key(path)], new_state[b_key(path)]
        dtype = torch.promote_types(A_new.dtype, torch.float32)
        new_state[path + ".lora_residual_B"] = torch.cat(
            [cs[b_key(path)].to(dtype) for cs in client_states] + [B_new.to(dtype)], dim=1
        )
        new_state[path + ".lora_residual_A"] = torch.cat(
            [
                cs[a_key(path)].to(dtype) * float(w)
                for cs, w in zip(client_states, weights, strict=True)
            ]
            + [-A_new.to(dtype)],
            dim=0,
        )
    return new_state, {}


METHOD = Method(
    name="fedex",
    layer="lora",
    ranks="equal",
    aggregate=aggregate,
    changes_base=True,
    linear=True,
    summary="FedEx-LoRA: average A and B, fold the exact residual into the frozen base",
)
