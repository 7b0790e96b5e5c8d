"""Pure-PyTorch implementations of every op: the CPU path and the test oracle.

Each function here computes exactly what its fused Triton twin computes, with plain torch ops
(so ``torch.compile`` can trace it on any device). Inputs are assumed validated by the public op.
Low-precision inputs are computed in float32 and the result cast back, as the kernels do.
"""

from __future__ import annotations

import torch

from fedlora_kernels._dispatch import row_slots, values_unavailable


def multihead_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    H: torch.Tensor,
    s: torch.Tensor,
    *,
    scale: float,
    seg_offsets: torch.Tensor,
    seg_adapter: torch.Tensor,
    head_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Multi-head LoRA adapter output, ``scale * Σ_i s[c,i] ((x A_iᵀ) H[c,i]ᵀ) B_iᵀ``.

    ``x`` ``[N, d_in]``; ``A`` ``[h, r, d_in]`` and ``B`` ``[h, d_out, r]`` are frozen (no
    gradient flows to them); ``H`` ``[C, h, r, r]`` and ``s`` ``[C, h]`` hold one core per adapter
    slot; row ``n`` uses the slot of its segment. ``head_mask`` ``[C, h]`` (0/1) zeroes the
    gradients of ``H`` and ``s`` for heads a slot does not train. Returns ``[N, d_out]`` in
    ``x.dtype``; computed in float32.
    """
    n, d_in = x.shape
    h, r, _ = A.shape
    num_slots = H.shape[0]
    if head_mask is not None:
        # identity in value, masks the gradient: a frozen head's core is seen through a detach
        keep = head_mask.to(H.dtype)
        H = H * keep[..., None, None] + (H * (1 - keep[..., None, None])).detach()
        s = s * keep.to(s.dtype) + (s * (1 - keep.to(s.dtype))).detach()
    xf = x.float()
    a_cat = A.detach().float().reshape(h * r, d_in)
    b_cat = B.detach().float().permute(1, 0, 2).reshape(B.shape[1], h * r)
    S = (xf @ a_cat.T).view(n, h, r)
    Hf, sf = H.float(), s.float()
    if num_slots == 1:
        T = torch.einsum("nhk,hjk->nhj", S, Hf[0]) * sf[0][None, :, None]
    elif not values_unavailable(x, seg_offsets):  # eager: one small core product per segment
        bounds = seg_offsets.tolist()
        T = torch.cat(
            [
                torch.einsum("nhk,hjk->nhj", S[bounds[t] : bounds[t + 1]], Hf[c])
                * sf[c][None, :, None]
                for t, c in enumerate(seg_adapter.tolist())
            ]
        )
    else:  # traced (or meta): gather each row's core (no data-dependent shapes)
        slot = row_slots(seg_offsets, seg_adapter, n)
        T = torch.einsum("nhk,nhjk->nhj", S, Hf[slot]) * sf[slot][:, :, None]
    y = (T.reshape(n, h * r) @ b_cat.T) * scale
    return y.to(x.dtype)


def _row_segments(seg_offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Segment index of every row, ``[num_rows]`` int64 (traceable: no data-dependent shapes)."""
    rows = torch.arange(num_rows, device=seg_offsets.device)
    seg = torch.searchsorted(seg_offsets[1:].contiguous(), rows, right=True)
    return seg.clamp_max(seg_offsets.numel() - 2)


def masked_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scale: float,
    rank_mask: torch.Tensor | None,
    grad_mask: torch.Tensor | None,
    seg_offsets: torch.Tensor,
    seg_adapter: torch.Tensor,
) -> torch.Tensor:
    """Masked LoRA adapter output, ``scale · ((x A_cᵀ) ⊙ m_t) B_cᵀ`` per row.

    ``x`` ``[N, d_in]``; ``A`` ``[C, R, d_in]`` and ``B`` ``[C, d_out, R]`` hold one adapter per
    slot (PEFT layout); row ``n`` of segment ``t`` uses slot ``c = seg_adapter[t]`` and the rank
    mask ``m_t = rank_mask[t]`` (``[S, R]`` of 0/1, float; ``None``: all components). ``grad_mask``
    ``[C, R]`` (0/1) leaves the value unchanged but lets gradient reach only the rows of ``A[c]``
    and columns of ``B[c]`` whose entry is 1; the others get exactly zero (this path computes
    their gradient and drops it; the Triton kernels skip it). Differentiable in ``x``, ``A``,
    ``B``. Computed in float32 and returned in ``x.dtype``.

    With ``C > 1``, eager calls run one shrink/expand per segment (the adapter FLOPs of one slot
    per row); while ``torch.compile`` traces, the shrink and expand run against all slots at once
    (``[N, C·R]``: ``C`` times the FLOPs, but no data-dependent shapes).
    """
    n, d_in = x.shape
    num_slots, rank, _ = A.shape
    d_out = B.shape[1]
    if grad_mask is not None:
        # identity in value; a frozen component is seen through a detach, so its gradient is 0
        keep = grad_mask != 0
        A = torch.where(keep[:, :, None], A, A.detach())
        B = torch.where(keep[:, None, :], B, B.detach())
    xf, af, bf = x.float(), A.float(), B.float()
    if num_slots > 1 and not values_unavailable(x, seg_offsets):
        ys = []
        bounds = seg_offsets.tolist()
        for t, c in enumerate(seg_adapter.tolist()):
            St = xf[bounds[t] : bounds[t + 1]] @ af[c].T
            if rank_mask is not None:
                St = St * rank_mask[t].float()
            ys.append((St * scale) @ bf[c].T)
        return torch.cat(ys).to(x.dtype) if ys else xf.new_zeros(0, d_out).to(x.dtype)
    if num_slots == 1:
        S = xf @ af[0].T
    else:
        slot = row_slots(seg_offsets, seg_adapter, n)
        s_all = (xf @ af.reshape(num_slots * rank, d_in).T).view(n, num_slots, rank)
        S = s_all.gather(1, slot.view(n, 1, 1).expand(n, 1, rank)).squeeze(1)
    if rank_mask is not None:
        S = S * rank_mask.float()[_row_segments(seg_offsets, n)]
    T = S * scale
    if num_slots == 1:
        y = T @ bf[0].T
    else:
        onehot = (slot[:, None] == torch.arange(num_slots, device=x.device)).to(T.dtype)
        t_cat = (onehot[:, :, None] * T[:, None, :]).reshape(n, num_slots * rank)
        y = t_cat @ bf.permute(1, 0, 2).reshape(d_out, num_slots * rank).T
    return y.to(x.dtype)


def adamw_bias_terms(
    step: float | torch.Tensor, lr: float, beta1: float, beta2: float
) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """``(step_size, sqrt(bias_correction2))`` exactly as ``torch.optim.AdamW`` forms them.

    ``step`` is a number (Python double arithmetic, like torch) or a per-slot tensor ``[C]``
    (computed in float64 and returned as float32 ``[C]``, the precision the update uses).
    """
    if isinstance(step, torch.Tensor):
        s = step.to(torch.float64)
        step_size = lr / (1 - torch.pow(beta1, s))
        bc2_sqrt = (1 - torch.pow(beta2, s)).sqrt()
        return step_size.to(torch.float32), bc2_sqrt.to(torch.float32)
    return lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


def masked_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float | torch.Tensor,
    rank_dim: int,
    importance: tuple[torch.Tensor, torch.Tensor, float, float] | None,
) -> None:
    """One AdamW step, in place, on the rank components whose mask is 1.

    ``param``, ``grad``, ``exp_avg``, ``exp_avg_sq`` are ``[C, M, K]`` (a 2-D parameter is passed
    as a view with ``C = 1``); ``mask`` ``[C, R]`` (0/1) indexes dimension ``1 + rank_dim`` (rows
    ``M = R`` of A for ``rank_dim=0``, columns ``K = R`` of B for ``rank_dim=1``). ``step`` is a
    number or a per-slot tensor ``[C]``. The arithmetic follows ``torch.optim.AdamW`` op for op
    (decoupled weight decay, then the bias-corrected Adam update), in float32; masked elements are
    written back with their own old value, so they stay bitwise unchanged.

    ``importance=(ema, unc, b1, b2)`` (tensors like ``param``) also updates HAFL's sensitivity
    statistics on the unmasked elements, from the weight BEFORE this step (``I = |w·g|`` at the
    weights the gradient was taken at): ``ema ← b1·ema + (1−b1)·I`` and then
    ``unc ← b2·unc + (1−b2)·|I − ema|`` with the updated ``ema`` (AdaLoRA's order).
    """
    keep = (mask != 0)[:, :, None] if rank_dim == 0 else (mask != 0)[:, None, :]
    # Every component on (the common case): update in place like torch.optim.AdamW, no select.
    # Value-dependent, so taken only in eager mode; the traced path is the selecting one.
    all_on = not values_unavailable(param, keep) and bool(keep.all())
    step_size, bc2_sqrt = adamw_bias_terms(step, lr, beta1, beta2)
    if isinstance(step_size, torch.Tensor):
        step_size = step_size.view(-1, 1, 1)
        bc2_sqrt = bc2_sqrt.view(-1, 1, 1)
    # float32 views (the tensors themselves when already float32): written in place only when
    # all_on, otherwise every new value goes to a temporary first
    p, g = param.float(), grad.float()
    m, v = exp_avg.float(), exp_avg_sq.float()
    if importance is not None:
        ema, unc, ib1, ib2 = importance
        sens = (p * g).abs()
        ema_new = ema.float() * ib1 + sens * (1 - ib1)
        unc_new = unc.float() * ib2 + (sens - ema_new).abs() * (1 - ib2)
        _write_back(ema, ema_new, None if all_on else keep)
        _write_back(unc, unc_new, None if all_on else keep)
    if all_on:
        p_new = p.mul_(1 - lr * weight_decay)
        m_new = m.lerp_(g, 1 - beta1)
        v_new = v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    else:
        p_new = p * (1 - lr * weight_decay)
        m_new = m.lerp(g, 1 - beta1)
        v_new = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
    denom = v_new.sqrt().div_(bc2_sqrt).add_(eps)
    if isinstance(step_size, torch.Tensor):
        p_new.addcmul_(m_new / denom, -step_size)
    else:
        p_new.addcdiv_(m_new, denom, value=-step_size)
    sel = None if all_on else keep
    _write_back(param, p_new, sel)
    _write_back(exp_avg, m_new, sel)
    _write_back(exp_avg_sq, v_new, sel)


def _write_back(dst: torch.Tensor, new: torch.Tensor, keep: torch.Tensor | None) -> None:
    """``dst[keep] = new[keep]`` in ``dst``'s dtype; the rest of ``dst`` is left bitwise as it is.
    ``keep=None`` means everywhere (a no-op when ``new`` already is ``dst``'s storage)."""
    if keep is None:
        if new.data_ptr() != dst.data_ptr() or new.dtype != dst.dtype:
            dst.copy_(new)
        return
    dst.copy_(torch.where(keep, new.to(dst.dtype), dst))


def masked_mean_coefficients(
    weights: torch.Tensor, mask: torch.Tensor | None, ranks: list[int], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convex per-client, per-rank-index coefficients of :func:`masked_weighted_mean`.

    With ``c[k, j] = w_k · m_kj`` for ``j < r_k`` (0 beyond the client's rank ``r_k``), returns
    ``coef[k, j] = c[k, j] / Σ_k c[k, j]`` (float32 ``[C, R]``) and ``has[j] = Σ_k c[k, j] > 0``
    (bool ``[R]``). Each column of ``coef`` with ``has`` is a convex combination (non-negative,
    summing to 1 up to rounding), so ``Σ_k coef[k, j] X_k[j]`` lies between the smallest and the
    largest contributing value and cannot overflow for finite inputs, even near the float32
    maximum. The coefficients are formed in float64 after dividing ``weights`` and ``mask`` by
    their largest entry, so weights anywhere in float64's range (1e308 as well as 1e-300) give
    the same answer as weights near 1. The Triton path uses the same two tensors, so both paths
    combine clients with bitwise the same coefficients.
    """
    device = weights.device
    w = weights.to(torch.float64)
    if w.numel():
        w = w / torch.where(w.amax() > 0, w.amax(), 1.0)
    idx = torch.arange(rank, device=device)
    held = idx[None, :] < torch.tensor(ranks, device=device, dtype=torch.int64)[:, None]
    c = w[:, None] * held.to(torch.float64)
    if mask is not None:
        m = mask.to(device=device, dtype=torch.float64)
        if m.numel():
            m = m / torch.where(m.amax() > 0, m.amax(), 1.0)
        c = c * m
    den = c.sum(0)
    has = den > 0
    coef = c / torch.where(has, den, 1.0)
    return coef.to(torch.float32), has


def masked_weighted_mean(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    rank_dim: int,
    fallback: torch.Tensor | None,
    rank: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Masked weighted mean over clients of tensors whose size along ``rank_dim`` may differ.

    ``out[j] = Σ_k w_k m_kj X_k[j] / Σ_k w_k m_kj`` along ``rank_dim`` (of full size ``rank``),
    where client ``k`` of rank ``r_k`` has ``m_kj = 0`` for ``j ≥ r_k``; ``fallback[j]`` (or 0)
    where the denominator is 0. Evaluated as ``Σ_k coef[k, j] X_k[j]`` with the convex
    coefficients of :func:`masked_mean_coefficients` (no overflow for finite inputs), accumulated
    in float32 in client order; elements with a zero coefficient are never read into the sum (a
    masked-out NaN does not propagate). Returns a new tensor of ``dtype``.
    """
    ranks = [int(x.shape[rank_dim]) for x in tensors]
    coef, has = masked_mean_coefficients(weights, mask, ranks, rank)
    shape = list(fallback.shape if fallback is not None else tensors[0].shape)
    shape[rank_dim] = rank
    device = fallback.device if fallback is not None else tensors[0].device
    num = torch.zeros(shape, dtype=torch.float32, device=device)
    view = [1] * len(shape)
    view[rank_dim] = -1
    for k, x in enumerate(tensors):
        c = coef[k, : ranks[k]].view(view)
        contrib = torch.where(c != 0, x.to(torch.float32) * c, 0.0)
        num.narrow(rank_dim, 0, ranks[k]).add_(contrib)
    fb = fallback.to(torch.float32) if fallback is not None else torch.zeros((), device=device)
    out = torch.where(has.view(view), num, fb)
    return out.to(dtype)
