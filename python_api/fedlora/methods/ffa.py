"""FFA-LoRA: ``A`` stays frozen at its shared-seed initialisation; only ``B`` is trained and
averaged, ``B_g = Σ p_k B_k``. Exact: ``B_g A = Σ p_k B_k A``.

Clients may omit ``<path>.lora_A.weight`` from their upload; an uploaded ``A`` must equal the
global's bitwise (a client that changed ``A`` would silently make the average inexact, so it is
rejected). Other keys are averaged. ``metas`` are not read. Streaming-capable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedlora.methods._common import (
    A_SUFFIX,
    ClientRejected,
    MaskedAccumulator,
    State,
    a_key,
    lora_paths,
    weighted_average,
)
from fedlora.methods._protocol import Budget, Client, Method


def check_client(global_state: State, state: State, meta: Mapping[str, Any]) -> None:
    """Reject an uploaded ``A`` that differs from the frozen global ``A``."""
    for path in lora_paths(global_state):
        key = a_key(path)
        if key in state and not torch.equal(state[key], global_state[key]):
            raise ClientRejected(key, "differs from the frozen global A (FFA-LoRA freezes A)")


def aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    metas: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FFA-LoRA's server rule: average ``B`` and the other keys, keep ``A``."""
    frozen = {a_key(p) for p in lora_paths(global_state)}
    keys = [k for k in global_state if k not in frozen]
    new_state = weighted_average(client_states, weights, keys, global_state)
    new_state.update({k: global_state[k].clone() for k in frozen})
    return {k: new_state[k] for k in global_state}, {}


def stream_add(
    acc: MaskedAccumulator, state: State, weight: float, meta: Mapping[str, Any]
) -> None:
    """Add one client's ``B`` factors and other keys to the running sums."""
    acc.add_full([k for k in acc.global_state if not k.endswith(A_SUFFIX)], state, weight)


def stream_result(acc: MaskedAccumulator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Averaged ``B`` and other keys, frozen ``A``."""
    return {key: acc.mean(key) for key in acc.global_state}, {}


class FFAClient(Client):
    """FFA-LoRA client: ``A`` frozen at its shared-seed initialisation, only ``B`` trains and
    travels (the upload leaves ``A`` out: half the bytes)."""

    def setup(self, model: nn.Module) -> None:
        from fedlora.state_dict import adapter_layers

        for _, layer in adapter_layers(model):
            layer.lora_A.requires_grad_(False)

    def upload(
        self, model: nn.Module, slot: int, budget: Budget
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        state, _ = super().upload(model, slot, budget)
        return {k: v for k, v in state.items() if not k.endswith(A_SUFFIX)}, {}


METHOD = Method(
    name="ffa",
    layer="lora",
    ranks="equal",
    aggregate=aggregate,
    client=FFAClient,
    check_client=check_client,
    stream_add=stream_add,
    stream_result=stream_result,
    linear=True,
    optional_suffixes=(A_SUFFIX,),
    summary="FFA-LoRA: A frozen at a shared seed, only B trained and averaged (exact)",
    upload_numel=lambda budget, shape, options: budget.rank * shape[0],  # B [d_out, r] only
)
