"""Triton kernels, launchers and autograd of :func:`fedlora_kernels.multihead_lora`.

Registered through :func:`fedlora_kernels.ops._triton_utils.register` (a ``triton_op`` with
``register_autograd``, so ``torch.compile`` traces into them on GPU). Inputs arrive validated
from :mod:`fedlora_kernels.ops.multihead`, with the segment tables of a
:class:`fedlora_kernels.RowSegments` planned once per batch (or none: the one-segment path);
see that module for the algorithm. The kernels are the shared tile loops of
:mod:`fedlora_kernels.ops._triton_utils` (:func:`shrink_tile`, :func:`expand_tile`) around the
per-segment core.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedlora_kernels.ops._triton_utils import (
    alloc_output,
    dot_precision,
    expand_tile,
    fused_gemm,
    launch,
    launch_gemm_lora,
    next_pow2,
    register,
    row_tile,
    row_tile_config,
    segment_rows,
    shrink_tile,
    sum_partials,
    tile_segments,
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
    t_ptr,
    base_ptr,
    off_ptr,
    segslot_ptr,
    tab_ptr,
    N,
    T,
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
    SINGLE: tl.constexpr,
    PREC: tl.constexpr,
    EXPAND: tl.constexpr = True,
):
    pid = tl.program_id(0)
    rows, rmask = row_tile(N, BM)
    rows64 = rows.to(tl.int64)
    js = tl.arange(0, RP)
    jmask = js < R
    js64 = js.to(tl.int64)
    # A_cat [R, D_IN]: row j at j·D_IN;  B_cat[o, j] = B[j // RH, o, j % RH]
    a_rows = js64 * D_IN
    b_col = (js64 // RH) * D_OUT * RH + js64 % RH

    # shrink: S = x A_catᵀ (the only pass over x), stored float32 for backward
    acc = tl.zeros([BM, RP], dtype=tl.float32)
    acc = shrink_tile(
        acc, x_ptr, sxm, sxk, rows64, rmask, a_ptr, a_rows, 1, jmask, D_IN, BK, UPCAST, PREC
    )
    tl.store(S_ptr + rows64[:, None] * R + js[None, :], acc, mask=rmask[:, None] & jmask[None, :])

    # core: T = s ⊙ (S H_bd[c]ᵀ), c = slot of each row's segment
    Tt = tl.zeros([BM, RP], dtype=tl.float32)
    seg_lo, seg_hi, _ = tile_segments(tab_ptr, T, pid, SINGLE)
    for t in range(seg_lo, seg_hi + 1):
        inseg, c = segment_rows(off_ptr, segslot_ptr, t, rows, N, SINGLE)
        hbd, sv = _core_tile(h_ptr, s_ptr, c, js, NH, RH, R)
        u = tl.dot(acc, tl.trans(hbd), input_precision="ieee") * sv[None, :]
        Tt = tl.where(inseg[:, None], u, Tt)

    # expand: y = (base +) scale · T B_catᵀ, streamed over d_out; EXPAND off (the fused
    # variant): store scale · T for the base GEMM's epilogue instead
    if EXPAND:
        expand_tile(
            Tt * scale, rows64, rmask, b_ptr, b_col, RH, jmask, D_OUT, y_ptr, sym, syn, base_ptr,
            sbm, sbn, ADD_BASE, BN, UPCAST, PREC,
        )  # fmt: skip
    else:
        tl.store(
            t_ptr + rows64[:, None] * R + js[None, :],
            Tt * scale,
            mask=rmask[:, None] & jmask[None, :],
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
    dS_ptr,
    dhp_ptr,
    dsp_ptr,
    off_ptr,
    segslot_ptr,
    tab_ptr,
    N,
    T,
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
    ADD_DX: tl.constexpr,
    SINGLE: tl.constexpr,
    PREC: tl.constexpr,
    WRITE_DX: tl.constexpr = True,
):
    pid = tl.program_id(0)
    rows, rmask = row_tile(N, BM)
    rows64 = rows.to(tl.int64)
    js = tl.arange(0, RP)
    jmask = js < R
    js64 = js.to(tl.int64)
    a_rows = js64 * D_IN
    b_col = (js64 // RH) * D_OUT * RH + js64 % RH

    # P = scale · dy B_cat  (the only pass over dy)
    P = tl.zeros([BM, RP], dtype=tl.float32)
    P = shrink_tile(
        P, dy_ptr, sdym, sdyn, rows64, rmask, b_ptr, b_col, RH, jmask, D_OUT, BN, UPCAST, PREC
    )
    P = P * scale
    S = tl.load(
        S_ptr + rows64[:, None] * R + js[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0
    )

    # per segment overlapping the tile: partial dH, ds; dS for the rows of the segment
    dS = tl.zeros([BM, RP], dtype=tl.float32)
    seg_lo, seg_hi, pair0 = tile_segments(tab_ptr, T, pid, SINGLE)
    same = (js[:, None] // RH) == (js[None, :] // RH)
    blk = same & jmask[:, None] & jmask[None, :]
    dh_off = (js[:, None] // RH) * RH * RH + (js[:, None] % RH) * RH + js[None, :] % RH
    for t in range(seg_lo, seg_hi + 1):
        inseg, c = segment_rows(off_ptr, segslot_ptr, t, rows, N, SINGLE)
        inseg = inseg & rmask
        pair = (pair0 + (t - seg_lo)).to(tl.int64)
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

    # dx (+)= dS A_cat, streamed over d_in (ADD_DX: into the base layer's input gradient);
    # WRITE_DX off (the fused variant): store dS for the dx GEMM's epilogue instead
    if WRITE_DX:
        expand_tile(
            dS, rows64, rmask, a_ptr, a_rows, 1, jmask, D_IN, dx_ptr, sdxm, sdxk, dx_ptr, sdxm,
            sdxk, ADD_DX, BK, UPCAST, PREC,
        )  # fmt: skip
    else:
        tl.store(
            dS_ptr + rows64[:, None] * R + js[None, :], dS, mask=rmask[:, None] & jmask[None, :]
        )


# ------------------------------------------------------------------------------------ launchers


def tile_configs(n: int, d_in: int, d_out: int, R: int) -> tuple[dict, dict]:
    """``(forward, backward)`` tile configs for ``n`` rows (pure functions of the shape: the op
    asks its segment plan for the tables of exactly these row tiles)."""
    rp = next_pow2(R)
    # the dense core tiles [RP, RP] (H, its transpose, dH) share the registers with five
    # [BM, RP] accumulators: at most 32 rows per backward program (64 spills on sm_90)
    return row_tile_config(n, d_in, d_out, rp), row_tile_config(n, d_in, d_out, rp, max_bm=32)


def _single(H: torch.Tensor, s: torch.Tensor, slot0: int, tiles: torch.Tensor | None):
    """One-segment path: the slot's own core (a view), no table."""
    if tiles is None:
        return H[slot0 : slot0 + 1], s[slot0 : slot0 + 1]
    return H, s


def _forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    H: torch.Tensor,
    s: torch.Tensor,
    offsets: torch.Tensor | None,
    adapter: torch.Tensor | None,
    tiles: torch.Tensor | None,
    tiles_bwd: torch.Tensor | None,
    owner_bwd: torch.Tensor | None,
    slot0: int,
    head_mask: torch.Tensor | None,
    scale: float,
    base_out: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: returns ``(y [N, d_out], S [N, h·r] float32)``; S is saved for backward.

    With ``base_weight`` (the frozen base layer, ``[d_out, d_in]``, and ``base_bias``) the op
    computes the base layer itself (cuBLAS) and the kernel accumulates the adapter into that
    output in place; its backward then adds the adapter's input gradient into the base's
    (``dx = dy W`` by cuBLAS, ``+= dS A_cat`` in the kernel's pass): no separate add anywhere.

    ``tiles`` (``[3, T]`` for the forward row tiles), ``tiles_bwd`` and ``owner_bwd`` (the
    backward's) come from the batch's :class:`fedlora_kernels.RowSegments`; all None: one
    segment using slot ``slot0`` (nothing planned, nothing read). With ``base_out`` ``[N,
    d_out]`` the kernel returns ``base_out + adapter`` (in ``base_out``'s dtype) in one pass."""
    n, d_in = x.shape
    h, r, _ = A.shape
    d_out = B.shape[1]
    R = h * r
    rp = next_pow2(R)
    out_dtype = base_out.dtype if base_out is not None else x.dtype
    fused = base_weight is not None and fused_gemm(base_weight.dtype)
    if fused:  # the base GEMM with the expand in its epilogue (after the shrink below)
        y = alloc_output((n, d_out), device=x.device, dtype=x.dtype)
    elif base_weight is not None:  # the base layer itself; the adapter is added in place
        y = torch.nn.functional.linear(x, base_weight, base_bias)
        base_out = y
    else:
        y = alloc_output((n, d_out), device=x.device, dtype=out_dtype)
    S = alloc_output((n, R), device=x.device, dtype=torch.float32)
    if n == 0:
        return y, S
    base = base_out if base_out is not None else y  # unread when ADD_BASE is off
    cfg, _ = tile_configs(n, d_in, d_out, R)
    Hk, sk = _single(H, s, slot0, tiles)
    single = tiles is None
    num_tiles = triton.cdiv(n, cfg["BM"])
    Tbuf = alloc_output((n, R), device=x.device, dtype=torch.float32) if fused else S
    Bc = B.contiguous()
    launch(
        _mh_fwd_kernel,
        (num_tiles,),
        x, A.contiguous(), Bc, Hk.contiguous(), sk.contiguous(), y, S, Tbuf, base,
        x if single else offsets, x if single else adapter, x if single else tiles,
        n, num_tiles, d_in, d_out, *x.stride(), *y.stride(), *base.stride(), scale,
        NH=h, RH=r, R=R, RP=rp, UPCAST=upcast_dots(), ADD_BASE=base_out is not None,
        SINGLE=single, PREC=dot_precision(A.dtype), EXPAND=not fused, **cfg,
    )  # fmt: skip
    if fused:  # y = x Wᵀ + b + T B_catᵀ; B_cat[n, j] = B[j // r, n, j % r] (shared by slots)
        launch_gemm_lora(
            x, base_weight, False, base_bias, Tbuf, Bc, (0, d_out * r, 1, r), r, y,
            None, None, None, cfg["BM"], 1.0,
        )  # fmt: skip
    return y, S


def _backward_kernels(
    dy: torch.Tensor,
    S: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    H: torch.Tensor,
    s: torch.Tensor,
    offsets: torch.Tensor | None,
    adapter: torch.Tensor | None,
    tiles: torch.Tensor | None,
    owner: torch.Tensor | None,
    slot0: int,
    head_mask: torch.Tensor | None,
    scale: float,
    dx_dtype: torch.dtype | None = None,
    base_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: returns ``(dx, dH, ds)``; ``dy`` may have any strides (even 0) and its own
    dtype (``base_out``'s); ``dx`` comes in ``dx_dtype`` (x's; default dy's). With
    ``base_weight`` ``dx`` is the whole input gradient, ``dy W + dS A_cat``: cuBLAS writes the
    base's part and the kernel adds the adapter's in its own pass over ``dx``."""
    n, R = S.shape
    h, r, d_in = A.shape
    d_out = B.shape[1]
    C = H.shape[0]
    rp = next_pow2(R)
    fused = base_weight is not None and fused_gemm(base_weight.dtype)
    if base_weight is not None and not fused:
        dx = torch.mm(dy.to(base_weight.dtype), base_weight).to(dx_dtype or dy.dtype)
    else:
        dx = alloc_output((n, d_in), device=dy.device, dtype=dx_dtype or dy.dtype)
    if n == 0:
        return dx, torch.zeros_like(H), torch.zeros_like(s)
    _, cfg = tile_configs(n, d_in, d_out, R)
    single = tiles is None
    num_tiles = triton.cdiv(n, cfg["BM"])
    pairs = num_tiles if single else owner.shape[1]
    dhp = torch.zeros((pairs, h, r, r), device=dy.device, dtype=torch.float32)
    dsp = torch.zeros((pairs, rp), device=dy.device, dtype=torch.float32)
    Hk, sk = _single(H, s, slot0, tiles)
    dS = alloc_output((n, R), device=dy.device, dtype=torch.float32) if fused else S
    Ac = A.contiguous()
    launch(
        _mh_bwd_kernel,
        (num_tiles,),
        dy, S, Ac, B.contiguous(), Hk.contiguous(), sk.contiguous(), dx, dS, dhp, dsp,
        dy if single else offsets, dy if single else adapter, dy if single else tiles,
        n, num_tiles, d_in, d_out, *dy.stride(), *dx.stride(), scale,
        NH=h, RH=r, R=R, RP=rp, UPCAST=upcast_dots(), ADD_DX=base_weight is not None,
        SINGLE=single, PREC=dot_precision(A.dtype), WRITE_DX=not fused, **cfg,
    )  # fmt: skip
    if fused:  # dx = dy W + dS A_cat; A_cat[j, k] = A[j // r, j % r, k]
        launch_gemm_lora(
            dy, base_weight, True, None, dS, Ac, (0, r * d_in, d_in, 1), r, dx,
            None, None, None, cfg["BM"], 1.0,
        )  # fmt: skip
    dH = sum_partials(dhp, owner, C, slot0)
    ds = sum_partials(dsp, owner, C, slot0)[:, :R].reshape(C, h, r).sum(-1)
    if head_mask is not None:
        dH = dH * head_mask[:, :, None, None]
        ds = ds * head_mask
    return dx, dH.to(H.dtype), ds.to(s.dtype)


def _setup_context(ctx, inputs, output):
    (x, A, B, H, s, offsets, adapter, _, tiles, owner, slot0, head_mask, scale, base_out,
     base_weight, _bias) = inputs  # fmt: skip
    ctx.has_base = base_out is not None
    ctx.x_dtype = x.dtype
    _, S = output
    ctx.save_for_backward(S, A, B, H, s, offsets, adapter, tiles, owner, head_mask, base_weight)
    ctx.scale, ctx.slot0 = scale, slot0


def _backward(ctx, dy, _dS):
    S, A, B, H, s, offsets, adapter, tiles, owner, head_mask, base_weight = ctx.saved_tensors
    dx, dH, ds = multihead_lora_bwd(
        dy, S, A, B, H, s, offsets, adapter, tiles, owner, ctx.slot0, head_mask, ctx.scale,
        ctx.x_dtype, base_weight,
    )  # fmt: skip
    d_base = dy if ctx.has_base else None  # y = base_out + adapter: identity to base_out
    # the frozen base weight and bias get no gradient (the public op refuses trainable ones)
    return (dx, None, None, dH, ds, *([None] * 8), d_base, None, None)


multihead_lora_bwd = register("fedlora::multihead_lora_bwd", _backward_kernels)
multihead_lora_fwd = register(
    "fedlora::multihead_lora_fwd", _forward, backward=_backward, setup_context=_setup_context
)
