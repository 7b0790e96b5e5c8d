"""FLoRA-NA: server-estimated aggregation coefficients, fitted on ``r×r`` Gram matrices.

Delta form: ``ΔA_u = A_u − A_g``, ``ΔB_u = B_u − B_g``; ``Â = A_g + Σ_u α_u p_u ΔA_u``,
``B̂ = B_g + Σ_u β_u p_u ΔB_u``, with ``α, β ∈ R^U`` minimising ``‖B̂Â − Σ_u p_u B_u A_u‖_F²``.
Starting from ``α = β = 1`` (FedIT), alternating least squares: with ``α`` fixed the objective is
quadratic in ``β`` and vice versa. Everything is expressed on the basis ``[B_g, B_1 … B_U]``,
``[A_g; A_1; …; A_U]``: ``B̂ = Σ b_u B_u`` with ``b = e_0 + Jβ`` (``J = [−pᵀ; diag p]``), likewise
``Â``, and every inner product reduces to the blocks ``B_uᵀB_v`` and ``A_uA_vᵀ`` (``r×r``) of two
Gram matrices formed once per layer (float64). No ``[d_out, d_in]`` matrix is formed; each ALS
step costs ``O(U² r²)``. The best iterate is kept, so the error is never above FedIT's (the
start). The same normalised ``p_u`` enter the fit and the applied update.

Options: ``shared=False`` (default: ``α, β`` per layer) or ``True`` (one ``α, β`` for all
layers, fitted to the summed error); ``iters`` (ALS rounds, default 20) and ``tol`` (stop when a
round improves the squared error by less than ``tol`` relative, default 1e-9). Clients hold the
global rank; ``metas`` are not read; other keys are ``p_k``-averaged. ``metrics`` report the
fitted ``florana_alpha`` / ``florana_beta`` per layer and the model-wide ``fedit_error`` the fit
started from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.methods._common import (
    State,
    a_key,
    average_other_keys,
    b_key,
    linear_combination,
    lora_paths,
)
from fedlora.methods._protocol import Client, Method, Option
from fedlora.metrics import relative_error


@dataclass
class _Layer:
    """Gram blocks of one layer on the basis (global, client 1, …, client U)."""

    GB: torch.Tensor  # [U+1, U+1, r, r], GB[u, v] = B_uᵀ B_v
    GA: torch.Tensor  # [U+1, U+1, r, r], GA[u, v] = A_u A_vᵀ
    ideal_sq: float


def _blocks(G: torch.Tensor, n: int, r: int) -> torch.Tensor:
    return G.view(n, r, n, r).permute(0, 2, 1, 3).contiguous()


def _layer(
    global_state: State, client_states: Sequence[State], path: str, pw: torch.Tensor
) -> _Layer:
    B_all = torch.cat(
        [global_state[b_key(path)].double().cpu()]
        + [cs[b_key(path)].double().cpu() for cs in client_states],
        dim=1,
    )
    A_all = torch.cat(
        [global_state[a_key(path)].double().cpu()]
        + [cs[a_key(path)].double().cpu() for cs in client_states],
        dim=0,
    )
    n, r = len(client_states) + 1, global_state[a_key(path)].shape[0]
    GB = _blocks(B_all.T @ B_all, n, r)
    GA = _blocks(A_all @ A_all.T, n, r)
    ideal_sq = float(torch.einsum("w,z,wzij,wzij->", pw, pw, GB, GA))
    return _Layer(GB, GA, ideal_sq)


def _err_sq(L: _Layer, a: torch.Tensor, b: torch.Tensor, pw: torch.Tensor) -> float:
    """``‖B̂Â − ideal‖²`` for basis coefficients ``a`` (of Â) and ``b`` (of B̂)."""
    BtB = torch.einsum("u,s,usij->ij", b, b, L.GB)
    AAt = torch.einsum("v,t,vtij->ij", a, a, L.GA)
    BW = torch.einsum("u,uwij->wij", b, L.GB)  # B̂ᵀ B_w
    AW = torch.einsum("v,vwij->wij", a, L.GA)  # Â A_wᵀ
    cross = torch.einsum("w,wij,wij->", pw, BW, AW)
    return float((BtB * AAt).sum() - 2 * cross) + L.ideal_sq


def _beta_system(L: _Layer, a: torch.Tensor, pw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic ``bᵀQb − 2bᵀq`` in ``b`` with ``a`` fixed."""
    AAt = torch.einsum("v,t,vtij->ij", a, a, L.GA)
    Q = torch.einsum("usij,ij->us", L.GB, AAt)
    AW = torch.einsum("v,vwij->wij", a, L.GA)
    q = torch.einsum("w,uwij,wij->u", pw, L.GB, AW)
    return Q, q


def _alpha_system(
    L: _Layer, b: torch.Tensor, pw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic ``aᵀQa − 2aᵀq`` in ``a`` with ``b`` fixed."""
    BtB = torch.einsum("u,s,usij->ij", b, b, L.GB)
    Q = torch.einsum("vtij,ij->vt", L.GA, BtB)
    BW = torch.einsum("u,uwij->wij", b, L.GB)
    q = torch.einsum("w,vwij,wij->v", pw, L.GA, BW)
    return Q, q


def _solve(
    systems: list[tuple[torch.Tensor, torch.Tensor]], J: torch.Tensor, e0: torch.Tensor
) -> torch.Tensor:
    """Minimiser over ``x`` of ``Σ_layers f(e0 + Jx)`` (minimum-norm where singular)."""
    G = sum(J.T @ Q @ J for Q, _ in systems)
    rhs = sum(J.T @ (q - Q @ e0) for Q, q in systems)
    return torch.linalg.lstsq(G, rhs[:, None], rcond=1e-12, driver="gelsd").solution[:, 0]


def _fit(
    layers: list[_Layer],
    pw: torch.Tensor,
    J: torch.Tensor,
    e0: torch.Tensor,
    iters: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """ALS over layers sharing one ``(α, β)``; returns the best ``(α, β)``, its squared error and
    FedIT's."""
    alpha = torch.ones(J.shape[1], dtype=torch.float64)
    beta = alpha.clone()

    def total(al: torch.Tensor, be: torch.Tensor) -> float:
        return sum(_err_sq(L, e0 + J @ al, e0 + J @ be, pw) for L in layers)

    fedit = best = total(alpha, beta)
    best_ab = (alpha.clone(), beta.clone())
    for _ in range(iters):
        start = best
        beta = _solve([_beta_system(L, e0 + J @ alpha, pw) for L in layers], J, e0)
        err = total(alpha, beta)
        if err < best:
            best, best_ab = err, (alpha.clone(), beta.clone())
        alpha = _solve([_alpha_system(L, e0 + J @ beta, pw) for L in layers], J, e0)
        err = total(alpha, beta)
        if err < best:
            best, best_ab = err, (alpha.clone(), beta.clone())
        if start - best <= tol * max(start, 1e-300):
            break
    return best_ab[0], best_ab[1], max(best, 0.0), max(fedit, 0.0)


def _combine(
    global_state: State,
    client_states: Sequence[State],
    path: str,
    a: torch.Tensor,
    b: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``Â``, ``B̂`` of one layer: the coefficients ``a``, ``b`` over ``[global, clients...]``."""
    out = {}
    for key, c in ((a_key(path), a.tolist()), (b_key(path), b.tolist())):
        basis = [global_state[key]] + [cs[key] for cs in client_states]
        out[key] = linear_combination(basis, c, global_state[key].dtype)
    return out


def aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    metas: Sequence[Mapping[str, Any]],
    *,
    shared: bool = False,
    iters: int = 20,
    tol: float = 1e-9,
    svd_error: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FLoRA-NA's server rule; see the module docstring. ``svd_error``: also report, on the
    same uploads, the relative error of FlexLoRA's rule (the best rank-``R`` factorisation of
    the exact sum ``Σ p_u B_u A_u``, from factors) as ``metrics["svd_error"]``, beside
    ``fedit_error`` and ``florana_fit_error`` (the reviewers' question: does the fit beat the
    truncated SVD of the exact sum?)."""
    if not isinstance(shared, bool):
        raise TypeError(f"shared must be a bool, got {shared!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    p = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    p = p / p.sum()
    U = p.numel()
    pw = torch.cat([torch.zeros(1, dtype=torch.float64), p])  # ideal = Σ p_u B_u A_u on the basis
    J = torch.cat([-p[None, :], torch.diag(p)], dim=0)
    e0 = torch.zeros(U + 1, dtype=torch.float64)
    e0[0] = 1.0
    paths = lora_paths(global_state)
    layers = {path: _layer(global_state, client_states, path, pw) for path in paths}
    groups = [paths] if shared else [[path] for path in paths]
    coefs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    fit_sq = fedit_sq = 0.0
    for group in groups:
        if not group:
            continue
        alpha, beta, err, fedit = _fit([layers[x] for x in group], pw, J, e0, iters, tol)
        fit_sq += err
        fedit_sq += fedit
        for path in group:
            coefs[path] = (alpha, beta)
    ideal_sq = sum(L.ideal_sq for L in layers.values())
    new_state: dict[str, torch.Tensor] = {}
    fallback: list[str] = []
    ones = torch.ones(U, dtype=torch.float64)
    for path in paths:
        alpha, beta = coefs[path]
        new_state.update(_combine(global_state, client_states, path, e0 + J @ alpha, e0 + J @ beta))
        if not all(bool(torch.isfinite(new_state[k]).all()) for k in (a_key(path), b_key(path))):
            # fitted coefficients outside [0, 1] can push factors near the float32 maximum
            # past it: this layer falls back to FedIT (α = β = 1, a convex combination)
            coefs[path] = (ones, ones)
            fallback.append(path)
            new_state.update(
                _combine(global_state, client_states, path, e0 + J @ ones, e0 + J @ ones)
            )
    average_other_keys(new_state, global_state, client_states, weights)
    extra = {
        "florana_alpha": {path: coefs[path][0].tolist() for path in paths},
        "florana_beta": {path: coefs[path][1].tolist() for path in paths},
        "fedit_error": relative_error(fedit_sq, ideal_sq),
        "florana_fit_error": relative_error(fit_sq, ideal_sq),
        "florana_fallback": fallback,
    }
    if svd_error:
        extra["svd_error"] = truncated_svd_error(global_state, client_states, p.tolist())
    return {k: new_state[k] for k in global_state}, extra


def truncated_svd_error(
    global_state: State, client_states: Sequence[State], weights: Sequence[float]
) -> float:
    """``‖ΔW − ΔW_R‖_F / ‖ΔW‖_F`` over all layers, ``ΔW = Σ p_u B_u A_u`` and ``ΔW_R`` its best
    rank-``R`` approximation (``R`` the global's rank: FlexLoRA's new global), from the
    singular values of the stacked factors (:func:`fedlora.methods.flexlora.factored_svd`)."""
    from fedlora.methods.flexlora import factored_svd

    cut = total = 0.0
    for path in lora_paths(global_state):
        R = global_state[a_key(path)].shape[0]
        roots = [float(w) ** 0.5 for w in weights]
        Bs = torch.cat(
            [cs[b_key(path)].double() * r for cs, r in zip(client_states, roots, strict=True)], 1
        )
        As = torch.cat(
            [cs[a_key(path)].double() * r for cs, r in zip(client_states, roots, strict=True)], 0
        )
        S = factored_svd(Bs, As)[1].square()
        cut += float(S[R:].sum())
        total += float(S.sum())
    return (cut / total) ** 0.5 if total > 0 else 0.0


OPTIONS = (
    Option(
        "florana_svd_error",
        "bool",
        False,
        "FLoRA-NA: also log, on the same uploads, "
        "the error of FlexLoRA's truncated SVD of the exact sum",
        server="svd_error",
    ),
)


class FloraNAClient(Client):
    """FLoRA-NA's client side: FedIT's, plus the method's options (its server option
    ``svd_error`` reaches :func:`aggregate` through :meth:`Client.server_options`)."""

    OPTIONS = OPTIONS


METHOD = Method(
    name="florana",
    layer="lora",
    ranks="equal",
    aggregate=aggregate,
    client=FloraNAClient,
    summary="FLoRA-NA: server-fitted per-client coefficients, error never above FedIT's",
    options=OPTIONS,
    logged=("fedit_error", "florana_fit_error", "svd_error"),
)
