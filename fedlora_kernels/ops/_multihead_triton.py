"""Triton kernels, launchers and autograd of :func:`fedlora_kernels.multihead_lora`.

Registered through :func:`fedlora_kernels.ops._triton_utils.register` (a ``triton_op`` with
``register_autograd``, so ``torch.compile`` traces into them on GPU). Inputs arrive validated
from :mod:`fedlora_kernels.ops.multihead`; see that module for the algorithm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedlora_kernels.ops._triton_utils import (
    alloc_output,
    dot_precision,
    launch,
    next_pow2,
    pair_slots,
    register,
    row_tile,
    row_tile_config,
    segment_rows,
    segment_tiles,
    sum_partials_by_slot,
    upcast_dots,
)


@triton.jit
def _core_tile(h_ptr, s_ptr, c, js, NH: tl.constexpr, RH: tl.constexpr, R: tl.constexpr):
    """Block-diagonal core of slot c as a dense [RP, RP] tile (hbd[j, k] = H[c, j//RH, j%RH, k%RH]
    when j and k are in the same head, else 0) and the per-column scalars s[c, j//RH]."""
    same = (js[:, None] // RH) == (js[None, :] // RH)
    valid = same & (js[:, None] < R) & (js[None, :] < R)
    h_off = c * NH * RH * RH + js[:, None] * RH + js[None, :] % RH
    hbd = tl.load(h_ptr + h_off, mask=valid, other=0.0).to(tl.float32)
    sv = tl.load(s_ptr + c * NH + js // RH, mask=js < R, other=0.0).to(tl.float32)
    return hbd, sv


@triton.jit
def _mh_fwd_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    h_ptr,
    s_ptr,
    y_ptr,
    S_ptr,
    base_ptr,
    off_ptr,
    segslot_ptr,
    tlo_ptr,
    thi_ptr,
    N,
    D_IN,
    D_OUT,
    sxm,
    sxk,
    sym,
    syn,
    sbm,
    sbn,
    scale,
    NH: tl.constexpr,
    RH: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    UPCAST: tl.constexpr,
    ADD_BASE: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, rmask = row_tile(N, BM)
    js = tl.arange(0, RP)
    jmask = js < R

    # shrink: S = x A_catᵀ (A is [R, D_IN] contiguous)
    ks = tl.arange(0, BK)
    acc = tl.zeros([BM, RP], dtype=tl.float32)
    for k0 in range(0, D_IN, BK):
        kk = k0 + ks
        xt = tl.load(
            x_ptr + rows[:, None] * sxm + kk[None, :] * sxk,
            mask=rmask[:, None] & (kk[None, :] < D_IN),
            other=0.0,
        )
        at = tl.load(
            a_ptr + js[None, :] * D_IN + kk[:, None],
            mask=jmask[None, :] & (kk[:, None] < D_IN),
            other=0.0,
        )
        if UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PREC)
    tl.store(S_ptr + rows[:, None] * R + js[None, :], acc, mask=rmask[:, None] & jmask[None, :])

    # core: T = s ⊙ (S H_bd[c]ᵀ), c = slot of each row's segment
    T = tl.zeros([BM, RP], dtype=tl.float32)
    seg_lo = tl.load(tlo_ptr + pid)
    seg_hi = tl.load(thi_ptr + pid)
    for t in range(seg_lo, seg_hi + 1):
        inseg, c = segment_rows(off_ptr, segslot_ptr, t, rows)
        hbd, sv = _core_tile(h_ptr, s_ptr, c, js, NH, RH, R)
        u = tl.dot(acc, tl.trans(hbd), input_precision="ieee") * sv[None, :]
        T = tl.where(inseg[:, None], u, T)
    T = T * scale
    if UPCAST:
        Tc = T
    else:
        Tc = T.to(y_ptr.dtype.element_ty)

    # expand: y = T B_catᵀ, B_cat[o, j] = B[j // RH, o, j % RH]
    ns = tl.arange(0, BN)
    b_col = (js // RH) * D_OUT * RH + js % RH
    for n0 in range(0, D_OUT, BN):
        nn = n0 + ns
        bt = tl.load(
            b_ptr + b_col[:, None] + nn[None, :] * RH,
            mask=jmask[:, None] & (nn[None, :] < D_OUT),
            other=0.0,
        )
        if UPCAST:
            bt = bt.to(tl.float32)
        y = tl.dot(Tc, bt, input_precision=PREC)
        ymask = rmask[:, None] & (nn[None, :] < D_OUT)
        if ADD_BASE:  # y = base + adapter in the same pass: no adapter-sized temporary
            base = tl.load(
                base_ptr + rows[:, None] * sbm + nn[None, :] * sbn, mask=ymask, other=0.0
            )
            y += base.to(tl.float32)
        tl.store(
            y_ptr + rows[:, None] * sym + nn[None, :] * syn,
            y.to(y_ptr.dtype.element_ty),
            mask=ymask,
        )


@triton.jit
def _mh_bwd_kernel(
    dy_ptr,
    S_ptr,
    a_ptr,
    b_ptr,
    h_ptr,
    s_ptr,
    dx_ptr,
    dhp_ptr,
    dsp_ptr,
    off_ptr,
    segslot_ptr,
    tlo_ptr,
    thi_ptr,
    tpair_ptr,
    N,
    D_IN,
    D_OUT,
    sdym,
    sdyn,
    sdxm,
    sdxk,
    scale,
    NH: tl.constexpr,
    RH: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, rmask = row_tile(N, BM)
    js = tl.arange(0, RP)
    jmask = js < R

    # P = scale · dy B_cat  (the only pass over dy)
    ns = tl.arange(0, BN)
    b_col = (js // RH) * D_OUT * RH + js % RH
    P = tl.zeros([BM, RP], dtype=tl.float32)
    for n0 in range(0, D_OUT, BN):
        nn = n0 + ns
        dyt = tl.load(
            dy_ptr + rows[:, None] * sdym + nn[None, :] * sdyn,
            mask=rmask[:, None] & (nn[None, :] < D_OUT),
            other=0.0,
        )
        bt = tl.load(
            b_ptr + b_col[None, :] + nn[:, None] * RH,
            mask=jmask[None, :] & (nn[:, None] < D_OUT),
            other=0.0,
        )
        if UPCAST:
            dyt = dyt.to(tl.float32)
            bt = bt.to(tl.float32)
        P = tl.dot(dyt, bt, P, input_precision=PREC)
    P = P * scale
    S = tl.load(
        S_ptr + rows[:, None] * R + js[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0
    )

    # per segment overlapping the tile: partial dH, ds; dS for the rows of the segment
    dS = tl.zeros([BM, RP], dtype=tl.float32)
    seg_lo = tl.load(tlo_ptr + pid)
    seg_hi = tl.load(thi_ptr + pid)
    pair0 = tl.load(tpair_ptr + pid)
    same = (js[:, None] // RH) == (js[None, :] // RH)
    blk = same & jmask[:, None] & jmask[None, :]
    dh_off = (js[:, None] // RH) * RH * RH + (js[:, None] % RH) * RH + js[None, :] % RH
    for t in range(seg_lo, seg_hi + 1):
        inseg, c = segment_rows(off_ptr, segslot_ptr, t, rows)
        inseg = inseg & rmask
        pair = pair0 + (t - seg_lo)
        hbd, sv = _core_tile(h_ptr, s_ptr, c, js, NH, RH, R)
        Pm = tl.where(inseg[:, None], P, 0.0)
        U = tl.dot(S, tl.trans(hbd), input_precision="ieee")
        # ds[c, i] = Σ_n Σ_{j in head i} P[n, j] U[n, j]   (per column here, per head on the host)
        tl.store(dsp_ptr + pair * RP + js, tl.sum(Pm * U, axis=0))
        Ps = Pm * sv[None, :]
        # dH[c, i][a, b] = s_i Σ_n P[n, i·r+a] S[n, i·r+b]   (diagonal blocks of Psᵀ S)
        dh = tl.dot(tl.trans(Ps), S, input_precision="ieee")
        tl.store(dhp_ptr + pair * NH * RH * RH + dh_off, dh, mask=blk)
        # dS = (s ⊙ P) H_bd
        dS += tl.dot(Ps, hbd, input_precision="ieee")

    # dx = dS A_cat
    ks = tl.arange(0, BK)
    if UPCAST:
        dSc = dS
    else:
        dSc = dS.to(dx_ptr.dtype.element_ty)
    for k0 in range(0, D_IN, BK):
        kk = k0 + ks
        at = tl.load(
            a_ptr + js[:, None] * D_IN + kk[None, :],
            mask=jmask[:, None] & (kk[None, :] < D_IN),
            other=0.0,
        )
        if UPCAST:
            at = at.to(tl.float32)
        dx = tl.dot(dSc, at, input_precision=PREC)
        tl.store(
            dx_ptr + rows[:, None] * sdxm + kk[None, :] * sdxk,
            dx.to(dx_ptr.dtype.element_ty),
            mask=rmask[:, None] & (kk[None, :] < D_IN),
        )


# ------------------------------------------------------------------------------------ launchers


def _forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    H: torch.Tensor,
    s: torch.Tensor,
    offsets: torch.Tensor,
    adapter: torch.Tensor,
    head_mask: torch.Tensor | None,
    scale: float,
    base_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: returns ``(y [N, d_out], S [N, h·r] float32)``; S is saved for backward.

    With ``base_out`` ``[N, d_out]`` the kernel returns ``base_out + adapter`` (in
    ``base_out``'s dtype) in the same pass."""
    n, d_in = x.shape
    h, r, _ = A.shape
    d_out = B.shape[1]
    R = h * r
    rp = next_pow2(R)
    out_dtype = base_out.dtype if base_out is not None else x.dtype
    y = alloc_output((n, d_out), device=x.device, dtype=out_dtype)
    S = alloc_output((n, R), device=x.device, dtype=torch.float32)
    if n == 0:
        return y, S
    base = base_out if base_out is not None else y  # unread when ADD_BASE is off
    cfg = row_tile_config(n, d_in, d_out, rp)
    plan = segment_tiles(offsets, n, cfg["BM"])
    launch(
        _mh_fwd_kernel,
        (triton.cdiv(n, cfg["BM"]),),
        x, A.contiguous(), B.contiguous(), H.contiguous(), s.contiguous(), y, S, base,
        offsets, adapter, plan.lo, plan.hi,
        n, d_in, d_out, *x.stride(), *y.stride(), *base.stride(), scale,
        NH=h, RH=r, R=R, RP=rp, UPCAST=upcast_dots(), ADD_BASE=base_out is not None,
        PREC=dot_precision(x.dtype), **cfg,
    )  # fmt: skip
    return y, S


def _backward_kernels(
    dy: torch.Tensor,
    S: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    H: torch.Tensor,
    s: torch.Tensor,
    offsets: torch.Tensor,
    adapter: torch.Tensor,
    head_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: returns ``(dx, dH, ds)``; ``dy`` may have any strides (even 0)."""
    n, R = S.shape
    h, r, d_in = A.shape
    d_out = B.shape[1]
    C = H.shape[0]
    rp = next_pow2(R)
    dx = alloc_output((n, d_in), device=dy.device, dtype=dy.dtype)
    if n == 0:
        return dx, torch.zeros_like(H), torch.zeros_like(s)
    # the dense core tiles [RP, RP] (H, its transpose, dH) share the registers with five
    # [BM, RP] accumulators: at most 32 rows per program (64 spills on sm_90)
    cfg = row_tile_config(n, d_in, d_out, rp, max_bm=32)
    plan = segment_tiles(offsets, n, cfg["BM"])
    dhp = torch.zeros((plan.max_pairs, h, r, r), device=dy.device, dtype=torch.float32)
    dsp = torch.zeros((plan.max_pairs, rp), device=dy.device, dtype=torch.float32)
    launch(
        _mh_bwd_kernel,
        (triton.cdiv(n, cfg["BM"]),),
        dy, S, A.contiguous(), B.contiguous(), H.contiguous(), s.contiguous(), dx, dhp, dsp,
        offsets, adapter, plan.lo, plan.hi, plan.pair_start,
        n, d_in, d_out, *dy.stride(), *dx.stride(), scale,
        NH=h, RH=r, R=R, RP=rp, UPCAST=upcast_dots(), PREC=dot_precision(dy.dtype), **cfg,
    )  # fmt: skip
    slots = pair_slots(plan, adapter)
    dH = sum_partials_by_slot(dhp, slots, C)
    ds = sum_partials_by_slot(dsp, slots, C)[:, :R].reshape(C, h, r).sum(-1)
    if head_mask is not None:
        dH = dH * head_mask[:, :, None, None]
        ds = ds * head_mask
    return dx, dH.to(H.dtype), ds.to(s.dtype)


def _setup_context(ctx, inputs, output):
    _, A, B, H, s, offsets, adapter, head_mask, scale, base_out = inputs
    ctx.has_base = base_out is not None
    _, S = output
    ctx.save_for_backward(S, A, B, H, s, offsets, adapter, head_mask)
    ctx.scale = scale


def _backward(ctx, dy, _dS):
    S, A, B, H, s, offsets, adapter, head_mask = ctx.saved_tensors
    dx, dH, ds = multihead_lora_bwd(dy, S, A, B, H, s, offsets, adapter, head_mask, ctx.scale)
    d_base = dy if ctx.has_base else None  # y = base_out + adapter: identity to base_out
    return dx, None, None, dH, ds, None, None, None, None, d_base


multihead_lora_bwd = register("fedlora::multihead_lora_bwd", _backward_kernels)
multihead_lora_fwd = register(
    "fedlora::multihead_lora_fwd", _forward, backward=_backward, setup_context=_setup_context
)
