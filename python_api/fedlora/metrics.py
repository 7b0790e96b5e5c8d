"""Aggregation error of a server rule, computed from LoRA factors (DESIGN §4).

``error = ‖ΔW_ideal − ΔW_global‖_F / ‖ΔW_ideal‖_F`` where ``ΔW_ideal = Σ_k p_k B_k A_k`` is what
exact averaging of the clients' updates would give and ``ΔW_global`` is what the aggregated state
(plus anything the clients fold into their frozen base) represents. Both are given as lists of
factor terms ``(B [d_out, r], A [r, d_in], c)`` meaning ``Σ c · B A``, so any method can describe
itself: FedIT ``[(B_g, A_g, 1)]``, FedEx ``[(B_g, A_g, 1), (B_res, A_res, 1)]``, Ravan
``[(B_cat, core·A_cat, 1)]``.

How it is computed: all terms are stacked, the global ones with negated coefficients,
``𝔅 = [c_t B_t]`` ``[d_out, m]`` and ``𝔄 = [A_t]`` ``[m, d_in]``; then
``‖𝔅𝔄‖_F² = Σ (𝔅ᵀ𝔅) ⊙ (𝔄𝔄ᵀ)`` (an ``[m, m]`` Gram product, in float64 because the difference of
nearly equal terms cancels), and ``‖ΔW_ideal‖²`` is the same sum over the ideal block. This needs
``m²(d_out + d_in)`` multiply-adds and no ``[d_out, d_in]`` matrix. When the stack is wider than
the layer (``d_out·d_in < m(d_out + d_in)``, e.g. 100 clients of rank 16 on a 384-wide layer)
the products of the ideal and the global stacks are cheaper and no larger than the stacked
factors already in memory, so they are formed instead; both routes give the same number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "FactorTerm",
    "aggregation_error",
    "error_parts",
    "factored_sq_norm",
    "relative_error",
]

FactorTerm = tuple[torch.Tensor, torch.Tensor, float]
"""``(B [d_out, r], A [r, d_in], coefficient)``: the matrix ``coefficient · B A``."""


def _stack(
    terms: Sequence[FactorTerm], sign: float, name: str, dtype: torch.dtype = torch.float64
) -> tuple[list, list]:
    bs, as_ = [], []
    for i, term in enumerate(terms):
        if not isinstance(term, (tuple, list)) or len(term) != 3:
            raise TypeError(f"{name}[{i}] must be a (B, A, coefficient) tuple, got {term!r}")
        B, A, c = term
        if not isinstance(B, torch.Tensor) or not isinstance(A, torch.Tensor):
            raise TypeError(f"{name}[{i}]: B and A must be tensors")
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"{name}[{i}] must hold B [d_out, r] and A [r, d_in], got B {list(B.shape)} and "
                f"A {list(A.shape)}"
            )
        coef = float(c) * sign
        bs.append(B.to(dtype) * coef)
        as_.append(A.to(dtype))
    return bs, as_


def error_parts(
    ideal: Sequence[FactorTerm],
    global_: Sequence[FactorTerm],
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float]:
    """``(‖ΔW_ideal − ΔW_global‖_F², ‖ΔW_ideal‖_F²)`` of one layer, from factors.

    ``ideal`` and ``global_`` are lists of ``(B, A, c)`` terms of one layer shape
    ``[d_out, d_in]`` (ranks may differ per term). Sum the parts over layers and pass them to
    :func:`relative_error` for a model-wide error. ``dtype=torch.float32`` halves the cost and
    is accurate to about ``eps32·sqrt(m) / error`` relative (``m`` the stacked rank): fine for a
    clearly inexact rule, not for an error near 0 (see :func:`fedlora.aggregate`).
    """
    b_i, a_i = _stack(ideal, 1.0, "ideal", dtype)
    b_g, a_g = _stack(global_, -1.0, "global_", dtype)
    bs, as_ = b_i + b_g, a_i + a_g
    if not bs:
        return 0.0, 0.0
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    for i, (B, A) in enumerate(zip(bs, as_, strict=True)):
        if B.shape[0] != d_out or A.shape[1] != d_in:
            raise ValueError(
                f"term {i} has shape [{B.shape[0]}, {A.shape[1]}], the first [{d_out}, {d_in}]: "
                "all terms must describe one layer"
            )
    device = bs[0].device
    bs = [B.to(device) for B in bs]
    as_ = [A.to(device) for A in as_]
    B_all = torch.cat(bs, dim=1)
    A_all = torch.cat(as_, dim=0)
    m = B_all.shape[1]
    m_ideal = sum(B.shape[1] for B in b_i)
    if d_out * d_in * m < m * m * (d_out + d_in):
        ideal_w = B_all[:, :m_ideal] @ A_all[:m_ideal]
        diff_w = ideal_w + B_all[:, m_ideal:] @ A_all[m_ideal:]  # global coefficients are negated
        diff = float(torch.linalg.matrix_norm(diff_w).square())
        ref = float(torch.linalg.matrix_norm(ideal_w).square())
    else:
        prod = (B_all.T @ B_all) * (A_all @ A_all.T)
        diff = float(prod.sum())
        ref = float(prod[:m_ideal, :m_ideal].sum())
    return max(diff, 0.0), max(ref, 0.0)


def relative_error(diff_sq: float, ideal_sq: float) -> float:
    """``sqrt(diff_sq / ideal_sq)``; 0 when both are 0, ``inf`` when only the ideal is 0."""
    if ideal_sq <= 0.0:
        return 0.0 if diff_sq <= 0.0 else math.inf
    return math.sqrt(diff_sq / ideal_sq)


def aggregation_error(ideal: Sequence[FactorTerm], global_: Sequence[FactorTerm]) -> float:
    """Relative aggregation error ``‖ΔW_ideal − ΔW_global‖_F / ‖ΔW_ideal‖_F`` of one layer."""
    return relative_error(*error_parts(ideal, global_))


def factored_sq_norm(terms: Iterable[FactorTerm]) -> float:
    """``‖Σ c B A‖_F²`` of a list of factor terms (no ``[d_out, d_in]`` matrix for thin terms)."""
    return error_parts(list(terms), [])[1]
