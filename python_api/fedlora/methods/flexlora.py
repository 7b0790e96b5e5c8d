"""FlexLoRA: heterogeneous ranks through the SVD of the exact average ``ΔW = Σ p_k B_k A_k``.

Server: ``ΔW`` is never formed. With the stacks ``𝔅 = [√p_1 B_1 … √p_K B_K]`` ``[d_out, n]`` and
``𝔄 = [√p_1 A_1; …; √p_K A_K]`` ``[n, d_in]`` (``n = Σ r_k``), ``ΔW = 𝔅𝔄``; thin QRs
``𝔅 = Q_B R_B`` and ``𝔄ᵀ = Q_A R_A`` leave the small core ``R_B R_Aᵀ`` ``[≤n, ≤n]`` whose SVD
``U Σ Vᵀ`` gives ``ΔW = (Q_B U) Σ (Q_A V)ᵀ`` (:func:`factored_svd`, float64). The new global keeps
the best rank-``R`` approximation in balanced form ``B = U_R Σ_R^½``, ``A = Σ_R^½ V_Rᵀ`` (exact when
``n ≤ R``); ``metrics["flexlora_energy"][path]`` is the kept fraction ``Σ_{i<R} σ_i² / Σ σ_i²``.

Client side: :func:`client_factors` gives client ``k`` the best rank-``r_k`` factors of the
global (again from factors only). Clients upload ``A [r_k, d_in]``, ``B [d_out, r_k]`` with
``r_k ≤ R``; ``metas[k]`` may declare ``{"rank": r_k}`` (or ``{"rank": {path: r_k}}``), checked
against the shapes. Other keys are ``p_k``-averaged. Not streaming-capable (the SVD needs every
client's factors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedlora.methods._common import (
    State,
    a_key,
    average_other_keys,
    b_key,
    check_declared_rank,
    lora_paths,
    rank_of,
)
from fedlora.methods._protocol import Budget, Method
from fedlora.methods.hetlora import PrefixClient


def check_client(global_state: State, state: State, meta: Mapping[str, Any]) -> None:
    """Reject a client whose declared rank disagrees with its uploaded shapes."""
    check_declared_rank(global_state, state, meta)


def factored_svd(
    B: torch.Tensor, A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of ``B @ A`` (``B`` ``[d_out, n]``, ``A`` ``[n, d_in]``) without
    forming it: QR of each factor, SVD of the ``[≤n, ≤n]`` core. Float64."""
    Q_B, R_B = torch.linalg.qr(B.to(torch.float64))
    Q_A, R_A = torch.linalg.qr(A.to(torch.float64).T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return Q_B @ U, S, Vh @ Q_A.T


def balanced_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A) = (U_r Σ_r^½, Σ_r^½ V_rᵀ)`` of rank exactly ``rank`` (zero components appended
    when the SVD has fewer)."""
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B = U.new_zeros((U.shape[0], rank))
    A = Vh.new_zeros((rank, Vh.shape[1]))
    B[:, :k] = U[:, :k] * root
    A[:k] = root[:, None] * Vh[:k]
    return B, A


def client_factors(global_state: State, rank: int | Mapping[str, int]) -> dict[str, torch.Tensor]:
    """What client ``k`` downloads: the best rank-``r_k`` balanced factors of every layer of the
    global (``rank`` an int or ``{path: int}``, ``1 ≤ r_k ≤ R``), other keys whole; copies."""
    out = {key: value.clone() for key, value in global_state.items()}
    for path in lora_paths(global_state):
        r = rank[path] if isinstance(rank, Mapping) else rank
        full = rank_of(global_state, path)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= full:
            raise ValueError(f"rank for {path!r} must be an int in [1, {full}], got {r!r}")
        A_g, B_g = global_state[a_key(path)], global_state[b_key(path)]
        B, A = balanced_factors(*factored_svd(B_g, A_g), r)
        out[a_key(path)] = A.to(A_g.dtype)
        out[b_key(path)] = B.to(B_g.dtype)
    return out


def aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    metas: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FlexLoRA's server rule: rank-``R`` SVD of ``Σ p_k B_k A_k`` from factors."""
    new_state: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    for path in lora_paths(global_state):
        A_g, B_g = global_state[a_key(path)], global_state[b_key(path)]
        roots = [float(w) ** 0.5 for w in weights]
        B_stack = torch.cat(
            [
                cs[b_key(path)].to(torch.float64) * s
                for cs, s in zip(client_states, roots, strict=True)
            ],
            dim=1,
        )
        A_stack = torch.cat(
            [
                cs[a_key(path)].to(torch.float64) * s
                for cs, s in zip(client_states, roots, strict=True)
            ],
            dim=0,
        )
        U, S, Vh = factored_svd(B_stack, A_stack)
        B, A = balanced_factors(U, S, Vh, A_g.shape[0])
        new_state[a_key(path)] = A.to(A_g.dtype)
        new_state[b_key(path)] = B.to(B_g.dtype)
        total = float(S.square().sum())
        energy[path] = float(S[: A_g.shape[0]].square().sum()) / total if total > 0 else 1.0
    average_other_keys(new_state, global_state, client_states, weights)
    from fedlora.methods.hetlora import round_segment_norms

    out = {k: new_state[k] for k in global_state}
    norms = round_segment_norms(out, client_states)
    return out, {"flexlora_energy": energy, "segment_norms": norms}


class FlexLoRAClient(PrefixClient):
    """FlexLoRA client: the server's global ΔW re-factored at the client's rank (best rank-r_k).

    Where ΔW has fewer than ``r_k`` non-zero singular values (always in the first round, when
    ΔW = 0) the SVD gives components with ``A`` row and ``B`` column both zero, which can never
    train (each factor's gradient goes through the other). Those rows of ``A`` are refilled
    from the run's initial adapter, with ``B`` still zero, so the function is unchanged. The
    initial adapter is the model's at ``setup`` (simulator) or the first global state this
    object downloads from (a server handing out downloads, e.g. the Flower strategy).
    """

    def __init__(self, options, budgets) -> None:
        super().__init__(options, budgets)
        self.initial: dict[str, torch.Tensor] | None = None

    def setup(self, model: nn.Module) -> None:
        from fedlora.state_dict import get_adapter_state_dict

        self.initial = get_adapter_state_dict(model, slot=0)

    def download(self, global_state: State, budget: Budget) -> dict[str, torch.Tensor]:
        from fedlora.methods import prefix

        if self.initial is None:
            self.initial = {k: v.detach().clone() for k, v in global_state.items()}
        state = client_factors(global_state, budget.rank)
        init = prefix.truncate(self.initial, budget.rank)
        for path in lora_paths(state):
            A, B = state[a_key(path)], state[b_key(path)]
            dead = (A.abs().sum(1) == 0) & (B.abs().sum(0) == 0)
            if bool(dead.any()):
                A = A.clone()
                A[dead] = init[a_key(path)][dead].to(A.dtype)
                state[a_key(path)] = A
        return state


METHOD = Method(
    name="flexlora",
    layer="lora",
    ranks="prefix",
    aggregate=aggregate,
    client=FlexLoRAClient,
    check_client=check_client,
    budget_fields=("rank", "steps"),
    summary="FlexLoRA: exact ΔW sum (no dense matrix), best rank-r_k factors per client",
    logged=("segment_norms",),
)
