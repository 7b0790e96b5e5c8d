"""Triton kernels, launchers and autograd of the masked-LoRA family.

Two ops live here: :func:`fedlora_kernels.masked_lora` (forward and backward, registered as
``torch.library.triton_op`` with ``register_autograd`` so ``torch.compile`` traces into them on
GPU) and the fused optimizer step :func:`fedlora_kernels.masked_adamw_` (an in-place
``triton_op``). Inputs arrive validated from :mod:`fedlora_kernels.ops.masked_lora` and
:mod:`fedlora_kernels.ops.masked_adamw`; see those modules for the algorithms.

Kernels of ``masked_lora``:

* ``_ml_fwd_kernel``: one program per row tile. Shrink ``S = x A_cᵀ`` over the whole of ``d_in``
  (each row with the ``A`` of its segment's slot), mask ``T = S ⊙ m_t``, store ``T`` (float32,
  kept for backward), then stream ``y = scale · T B_cᵀ`` over ``d_out``. ``x`` is read once.
* ``_ml_bwd_rows_kernel``: one program per row tile. ``dS = scale · (dy B_c) ⊙ m_t`` (the only
  pass over ``dy`` of this kernel), stored for ``dA``, then ``dx = dS A_c`` streamed.
* ``_ml_reduce_kernel`` (launched twice): ``dB_c = Σ_rows dyᵀ T`` and ``dA_c = Σ_rows dSᵀ x``.
  The grid is (rank block, column tile, row chunk); each program writes one partial per
  (chunk, segment) pair it overlaps, and the partials are summed per slot by a small owner-matrix
  matmul in a fixed order: deterministic, no atomics. A slot's trainable components are listed
  first (``kidx``, ``cnt``) so a program whose rank block holds only frozen components does
  nothing at all: frozen components cost no FLOPs and no partial writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fedlora_kernels.ops._triton_utils import (
    alloc_output,
    dot_precision,
    next_pow2,
    segment_tiles,
    upcast_dots,
)


def alloc_partials(shape: tuple[int, ...], *, device: torch.device) -> torch.Tensor:
    """Zero-filled float32 buffer for per-(chunk, segment) partial gradients.

    The reduction kernels write only the entries of trainable components; frozen ones keep this
    zero. Tests swap the function for one that fills NaN, to prove frozen entries are never
    written (their work is skipped, not done and discarded).
    """
    return torch.zeros(shape, device=device, dtype=torch.float32)


# ------------------------------------------------------------------------------------ kernels


@triton.jit
def _row_mask(
    rm_ptr, off_ptr, rows, js, seg_lo, seg_hi, R: tl.constexpr, BM: tl.constexpr, RP: tl.constexpr
):
    """Per-row rank mask ``[BM, RP]``: row n of segment t gets ``rank_mask[t]``."""
    M = tl.zeros([BM, RP], dtype=tl.float32)
    for t in range(seg_lo, seg_hi + 1):
        start = tl.load(off_ptr + t)
        end = tl.load(off_ptr + t + 1)
        inseg = (rows >= start) & (rows < end)
        mt = tl.load(rm_ptr + t * R + js, mask=js < R, other=0.0)
        M = tl.where(inseg[:, None], mt[None, :], M)
    return M


@triton.jit
def _ml_fwd_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    rm_ptr,
    y_ptr,
    t_ptr,
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
    scale,
    R: tl.constexpr,
    RP: tl.constexpr,
    HAS_RM: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    js = tl.arange(0, RP)
    jmask = js < R
    seg_lo = tl.load(tlo_ptr + pid)
    seg_hi = tl.load(thi_ptr + pid)

    # shrink: S[n] = x[n] A_cᵀ, c = slot of row n's segment (x tile loaded once per k step)
    ks = tl.arange(0, BK)
    acc = tl.zeros([BM, RP], dtype=tl.float32)
    for k0 in range(0, D_IN, BK):
        kk = k0 + ks
        kmask = kk < D_IN
        xt = tl.load(
            x_ptr + rows64[:, None] * sxm + kk[None, :] * sxk,
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        if UPCAST:
            xt = xt.to(tl.float32)
        for t in range(seg_lo, seg_hi + 1):
            start = tl.load(off_ptr + t)
            end = tl.load(off_ptr + t + 1)
            c = tl.load(segslot_ptr + t).to(tl.int64)
            inseg = (rows >= start) & (rows < end)
            at = tl.load(
                a_ptr + c * R * D_IN + js[None, :] * D_IN + kk[:, None],
                mask=jmask[None, :] & kmask[:, None],
                other=0.0,
            )
            if UPCAST:
                at = at.to(tl.float32)
            xs = tl.where(inseg[:, None], xt, tl.zeros_like(xt))
            acc = tl.dot(xs, at, acc, input_precision=PREC)

    # mask: T = S ⊙ m_t, kept (unscaled, float32) for the dB reduction
    T = acc
    if HAS_RM:
        T = T * _row_mask(rm_ptr, off_ptr, rows, js, seg_lo, seg_hi, R, BM, RP)
    tl.store(t_ptr + rows64[:, None] * R + js[None, :], T, mask=rmask[:, None] & jmask[None, :])
    T = T * scale
    if UPCAST:
        Tc = T
    else:
        Tc = T.to(y_ptr.dtype.element_ty)

    # expand: y[n] = scale · T[n] B_cᵀ, streamed over d_out
    ns = tl.arange(0, BN)
    for n0 in range(0, D_OUT, BN):
        nn = n0 + ns
        nmask = nn < D_OUT
        y = tl.zeros([BM, BN], dtype=tl.float32)
        for t in range(seg_lo, seg_hi + 1):
            start = tl.load(off_ptr + t)
            end = tl.load(off_ptr + t + 1)
            c = tl.load(segslot_ptr + t).to(tl.int64)
            inseg = (rows >= start) & (rows < end)
            bt = tl.load(
                b_ptr + c * D_OUT * R + nn[None, :] * R + js[:, None],
                mask=jmask[:, None] & nmask[None, :],
                other=0.0,
            )
            if UPCAST:
                bt = bt.to(tl.float32)
            ts = tl.where(inseg[:, None], Tc, tl.zeros_like(Tc))
            y = tl.dot(ts, bt, y, input_precision=PREC)
        tl.store(
            y_ptr + rows64[:, None] * sym + nn[None, :] * syn,
            y.to(y_ptr.dtype.element_ty),
            mask=rmask[:, None] & nmask[None, :],
        )


@triton.jit
def _ml_bwd_rows_kernel(
    dy_ptr,
    a_ptr,
    b_ptr,
    rm_ptr,
    dx_ptr,
    ds_ptr,
    off_ptr,
    segslot_ptr,
    tlo_ptr,
    thi_ptr,
    N,
    D_IN,
    D_OUT,
    sdym,
    sdyn,
    sdxm,
    sdxk,
    scale,
    R: tl.constexpr,
    RP: tl.constexpr,
    HAS_RM: tl.constexpr,
    WRITE_DX: tl.constexpr,
    WRITE_DS: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    js = tl.arange(0, RP)
    jmask = js < R
    seg_lo = tl.load(tlo_ptr + pid)
    seg_hi = tl.load(thi_ptr + pid)

    # P[n] = dy[n] B_c  (dy read once, any strides)
    ns = tl.arange(0, BN)
    P = tl.zeros([BM, RP], dtype=tl.float32)
    for n0 in range(0, D_OUT, BN):
        nn = n0 + ns
        nmask = nn < D_OUT
        dyt = tl.load(
            dy_ptr + rows64[:, None] * sdym + nn[None, :] * sdyn,
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        )
        if UPCAST:
            dyt = dyt.to(tl.float32)
        for t in range(seg_lo, seg_hi + 1):
            start = tl.load(off_ptr + t)
            end = tl.load(off_ptr + t + 1)
            c = tl.load(segslot_ptr + t).to(tl.int64)
            inseg = (rows >= start) & (rows < end)
            bt = tl.load(
                b_ptr + c * D_OUT * R + nn[:, None] * R + js[None, :],
                mask=nmask[:, None] & jmask[None, :],
                other=0.0,
            )
            if UPCAST:
                bt = bt.to(tl.float32)
            dys = tl.where(inseg[:, None], dyt, tl.zeros_like(dyt))
            P = tl.dot(dys, bt, P, input_precision=PREC)

    # dS = scale · P ⊙ m_t: kept for the dA reduction
    dS = P * scale
    if HAS_RM:
        dS = dS * _row_mask(rm_ptr, off_ptr, rows, js, seg_lo, seg_hi, R, BM, RP)
    if WRITE_DS:
        tl.store(
            ds_ptr + rows64[:, None] * R + js[None, :], dS, mask=rmask[:, None] & jmask[None, :]
        )

    # dx[n] = dS[n] A_c, streamed over d_in
    if WRITE_DX:
        if UPCAST:
            dSc = dS
        else:
            dSc = dS.to(dx_ptr.dtype.element_ty)
        ks = tl.arange(0, BK)
        for k0 in range(0, D_IN, BK):
            kk = k0 + ks
            kmask = kk < D_IN
            dx = tl.zeros([BM, BK], dtype=tl.float32)
            for t in range(seg_lo, seg_hi + 1):
                start = tl.load(off_ptr + t)
                end = tl.load(off_ptr + t + 1)
                c = tl.load(segslot_ptr + t).to(tl.int64)
                inseg = (rows >= start) & (rows < end)
                at = tl.load(
                    a_ptr + c * R * D_IN + js[:, None] * D_IN + kk[None, :],
                    mask=jmask[:, None] & kmask[None, :],
                    other=0.0,
                )
                if UPCAST:
                    at = at.to(tl.float32)
                ds_s = tl.where(inseg[:, None], dSc, tl.zeros_like(dSc))
                dx = tl.dot(ds_s, at, dx, input_precision=PREC)
            tl.store(
                dx_ptr + rows64[:, None] * sdxm + kk[None, :] * sdxk,
                dx.to(dx_ptr.dtype.element_ty),
                mask=rmask[:, None] & kmask[None, :],
            )


@triton.jit
def _ml_reduce_kernel(
    u_ptr,
    v_ptr,
    part_ptr,
    kidx_ptr,
    cnt_ptr,
    off_ptr,
    segslot_ptr,
    clo_ptr,
    chi_ptr,
    cpair_ptr,
    N,
    D,
    sum_,
    suk,
    spp,
    spd,
    spj,
    CH,
    R: tl.constexpr,
    RB: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """``part[pair, d, j] = Σ_{rows of (chunk, segment)} u[row, d] · v[row, j]`` for the trainable
    components ``j`` of the segment's slot, in blocks of ``RB`` of them.

    ``u`` is ``dy`` (for dB) or ``x`` (for dA), any strides; ``v`` is ``T`` or ``dS``, float32
    ``[N, R]``. Rank block ``rb`` covers the ``rb``-th ``RB`` entries of the slot's list of
    trainable components ``kidx[c]``; past ``cnt[c]`` the program has nothing to do.
    """
    rb = tl.program_id(0)
    pd = tl.program_id(1)
    pc = tl.program_id(2)
    dd = pd * BD + tl.arange(0, BD)
    dmask = dd < D
    ch_lo = pc * CH
    ch_hi = tl.minimum(ch_lo + CH, N)
    seg_lo = tl.load(clo_ptr + pc)
    seg_hi = tl.load(chi_ptr + pc)
    pair0 = tl.load(cpair_ptr + pc)
    jr = rb * RB + tl.arange(0, RB)
    ms = tl.arange(0, BM)
    for t in range(seg_lo, seg_hi + 1):
        c = tl.load(segslot_ptr + t)
        K = tl.load(cnt_ptr + c)
        if rb * RB < K:
            jv = jr < K
            jj = tl.load(kidx_ptr + c * R + jr, mask=jv, other=0)
            r_lo = tl.maximum(tl.load(off_ptr + t).to(tl.int32), ch_lo)
            r_hi = tl.minimum(tl.load(off_ptr + t + 1).to(tl.int32), ch_hi)
            acc = tl.zeros([BD, RB], dtype=tl.float32)
            for m0 in range(r_lo, r_hi, BM):
                rows = m0 + ms
                rv = rows < r_hi
                rows64 = rows.to(tl.int64)
                ut = tl.load(
                    u_ptr + rows64[None, :] * sum_ + dd[:, None] * suk,
                    mask=dmask[:, None] & rv[None, :],
                    other=0.0,
                )
                vt = tl.load(
                    v_ptr + rows64[:, None] * R + jj[None, :],
                    mask=rv[:, None] & jv[None, :],
                    other=0.0,
                )
                if UPCAST:
                    ut = ut.to(tl.float32)
                else:
                    vt = vt.to(u_ptr.dtype.element_ty)
                acc = tl.dot(ut, vt, acc, input_precision=PREC)
            pair = (pair0 + t - seg_lo).to(tl.int64)
            tl.store(
                part_ptr + pair * spp + dd[:, None] * spd + jj[None, :] * spj,
                acc,
                mask=dmask[:, None] & jv[None, :],
            )


# ------------------------------------------------------------------------------------ launchers


def _row_tiles(n: int, d_in: int, d_out: int, rp: int) -> tuple[int, int, int, int]:
    """(BM, BK, BN, num_warps) of the row-tile kernels: enough row tiles to fill the device,
    register use bounded by the padded rank ``rp``."""
    bm = 64 if n >= 8192 else (32 if n >= 1024 else 16)
    if rp >= 256:
        bm = 16
    bk = 64 if rp <= 64 else 32
    bn = 64 if rp <= 64 else 32
    return bm, min(bk, next_pow2(d_in)), min(bn, next_pow2(d_out)), 4


def _reduce_tiles(n: int, d: int, rp: int) -> tuple[int, int, int, int]:
    """(rank block RB, rows per step BM, columns per program BD, rows per chunk CH).

    RB is the granularity at which frozen components are skipped. About 8 row chunks (at least
    one BM each) give the grid enough programs without a big partial buffer.
    """
    rb = 16 if rp <= 32 else 32
    bm = 64 if n >= 4096 else 32
    bd = min(64, next_pow2(d))
    chunk = -(-max(n, 1) // 8)
    chunk = -(-chunk // bm) * bm
    return rb, bm, bd, chunk


def grad_plan(
    grad_mask: torch.Tensor | None,
    rank_mask: torch.Tensor | None,
    adapter: torch.Tensor,
    num_slots: int,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which components of each slot need a gradient, as ``(kidx [C, R] int32, cnt [C] int32)``.

    A component needs one when ``grad_mask`` lets it train AND some segment of the slot uses it
    (rank mask 1): a component truncated away everywhere, or a slot no segment uses, has a zero
    gradient and is skipped like a frozen one. ``kidx[c, :cnt[c]]`` lists those components in
    increasing order (the rest of the row is the others). Computed on device, no host sync.
    """
    device = adapter.device
    uses = rank_mask if rank_mask is not None else torch.ones(adapter.numel(), rank, device=device)
    used = torch.zeros(num_slots, rank, device=device, dtype=torch.float32)
    used = used.index_add(0, adapter, uses.to(torch.float32))
    need = used > 0
    if grad_mask is not None:
        need = need & (grad_mask != 0)
    kidx = torch.argsort((~need).to(torch.int32), dim=1, stable=True).to(torch.int32)
    cnt = need.sum(dim=1).to(torch.int32)
    return kidx.contiguous(), cnt


def _reduce(
    u: torch.Tensor,
    v: torch.Tensor,
    kidx: torch.Tensor,
    cnt: torch.Tensor,
    offsets: torch.Tensor,
    adapter: torch.Tensor,
    num_slots: int,
    transpose_out: bool,
) -> torch.Tensor:
    """Per-slot ``Σ_rows uᵀ v`` over the trainable components: ``[C, D, R]`` (or ``[C, R, D]``
    with ``transpose_out``), float32, exactly zero for the other components."""
    n, d = u.shape
    rank = v.shape[1]
    rb, bm, bd, chunk = _reduce_tiles(n, d, next_pow2(rank))
    lo, hi, pair_start, max_pairs = segment_tiles(offsets, n, chunk)
    if transpose_out:
        part = alloc_partials((max_pairs, rank, d), device=u.device)
        spd, spj = 1, d
    else:
        part = alloc_partials((max_pairs, d, rank), device=u.device)
        spd, spj = rank, 1
    n_chunks = max(1, -(-n // chunk))
    grid = (triton.cdiv(rank, rb), triton.cdiv(d, bd), n_chunks)
    wrap_triton(_ml_reduce_kernel)[grid](
        u,
        v,
        part,
        kidx,
        cnt,
        offsets,
        adapter,
        lo,
        hi,
        pair_start,
        n,
        d,
        u.stride(0),
        u.stride(1),
        part.stride(0),
        spd,
        spj,
        chunk,
        R=rank,
        RB=rb,
        BM=bm,
        BD=bd,
        UPCAST=upcast_dots(),
        PREC=dot_precision(u.dtype),
        num_warps=4,
    )
    # fixed-order sum of the (chunk, segment) partials into their slots: owner [C, P] @ part
    counts = hi - lo + 1
    pslot = torch.full((max_pairs,), -1, device=u.device, dtype=torch.int64)
    pair_ids = torch.arange(max_pairs, device=u.device)
    # pair p belongs to chunk k with pair_start[k] <= p < pair_start[k] + counts[k]
    chunk_of = torch.searchsorted((pair_start + counts).to(torch.int64), pair_ids, right=True)
    valid = chunk_of < lo.numel()
    chunk_of = chunk_of.clamp_max(lo.numel() - 1)
    seg_of = lo[chunk_of].to(torch.int64) + (pair_ids - pair_start[chunk_of].to(torch.int64))
    seg_of = seg_of.clamp(0, adapter.numel() - 1)
    pslot = torch.where(valid, adapter[seg_of], pslot)
    owner = (pslot[None, :] == torch.arange(num_slots, device=u.device)[:, None]).to(torch.float32)
    out = owner @ part.reshape(max_pairs, -1)
    return out.reshape(num_slots, *part.shape[1:])


@triton_op("fedlora::masked_lora_fwd", mutates_args=())
def masked_lora_fwd(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    rank_mask: torch.Tensor | None,
    grad_mask: torch.Tensor | None,
    offsets: torch.Tensor,
    adapter: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: returns ``(y [N, d_out], T [N, R] float32)``; ``T = (x A_cᵀ) ⊙ m_t`` is saved
    for backward. ``grad_mask`` is unused here; it is an input so backward can see it."""
    n, d_in = x.shape
    _, rank, _ = A.shape
    d_out = B.shape[1]
    rp = next_pow2(rank)
    y = alloc_output((n, d_out), device=x.device, dtype=x.dtype)
    T = alloc_output((n, rank), device=x.device, dtype=torch.float32)
    if n == 0:
        return y, T
    bm, bk, bn, warps = _row_tiles(n, d_in, d_out, rp)
    lo, hi, _, _ = segment_tiles(offsets, n, bm)
    grid = (triton.cdiv(n, bm),)
    wrap_triton(_ml_fwd_kernel)[grid](
        x,
        A.contiguous(),
        B.contiguous(),
        rank_mask if rank_mask is not None else T,
        y,
        T,
        offsets,
        adapter,
        lo,
        hi,
        n,
        d_in,
        d_out,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        scale,
        R=rank,
        RP=rp,
        HAS_RM=rank_mask is not None,
        BM=bm,
        BK=bk,
        BN=bn,
        UPCAST=upcast_dots(),
        PREC=dot_precision(x.dtype),
        num_warps=warps,
    )
    return y, T


@triton_op("fedlora::masked_lora_bwd", mutates_args=())
def masked_lora_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    T: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    rank_mask: torch.Tensor | None,
    grad_mask: torch.Tensor | None,
    offsets: torch.Tensor,
    adapter: torch.Tensor,
    scale: float,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: returns ``(dx, dA, dB)``; a gradient that is not needed comes back empty.

    ``dy`` may have any strides (even 0). ``dA``/``dB`` are exactly zero on the components
    ``grad_mask`` freezes, and no work is spent on them.
    """
    n, d_in = x.shape
    num_slots, rank, _ = A.shape
    d_out = B.shape[1]
    rp = next_pow2(rank)
    device = dy.device
    empty = torch.empty(0, device=device, dtype=dy.dtype)
    dx = alloc_output((n, d_in), device=device, dtype=dy.dtype) if need_dx else empty
    dA = torch.zeros_like(A) if need_dA else torch.empty(0, device=device, dtype=A.dtype)
    dB = torch.zeros_like(B) if need_dB else torch.empty(0, device=device, dtype=B.dtype)
    if n == 0:
        return dx, dA, dB
    A = A.contiguous()
    B = B.contiguous()
    dS = alloc_output((n, rank), device=device, dtype=torch.float32) if need_dA else T
    if need_dx or need_dA:
        bm, bk, bn, warps = _row_tiles(n, d_in, d_out, rp)
        lo, hi, _, _ = segment_tiles(offsets, n, bm)
        wrap_triton(_ml_bwd_rows_kernel)[(triton.cdiv(n, bm),)](
            dy,
            A,
            B,
            rank_mask if rank_mask is not None else T,
            dx if need_dx else dy,
            dS,
            offsets,
            adapter,
            lo,
            hi,
            n,
            d_in,
            d_out,
            dy.stride(0),
            dy.stride(1),
            dx.stride(0) if need_dx else 0,
            dx.stride(1) if need_dx else 0,
            scale,
            R=rank,
            RP=rp,
            HAS_RM=rank_mask is not None,
            WRITE_DX=need_dx,
            WRITE_DS=need_dA,
            BM=bm,
            BK=bk,
            BN=bn,
            UPCAST=upcast_dots(),
            PREC=dot_precision(dy.dtype),
            num_warps=warps,
        )
    if need_dA or need_dB:
        kidx, cnt = grad_plan(grad_mask, rank_mask, adapter, num_slots, rank)
        if need_dB:
            dB = (_reduce(dy, T, kidx, cnt, offsets, adapter, num_slots, False) * scale).to(B.dtype)
        if need_dA:
            dA = _reduce(x, dS, kidx, cnt, offsets, adapter, num_slots, True).to(A.dtype)
    return dx, dA, dB


def _setup_context(ctx, inputs, output):
    x, A, B, rank_mask, grad_mask, offsets, adapter, scale = inputs
    _, T = output
    ctx.save_for_backward(x, T, A, B, rank_mask, grad_mask, offsets, adapter)
    ctx.scale = scale


def _backward(ctx, dy, _dT):
    x, T, A, B, rank_mask, grad_mask, offsets, adapter = ctx.saved_tensors
    need_dx, need_dA, need_dB = ctx.needs_input_grad[:3]
    dx, dA, dB = masked_lora_bwd(
        dy, x, T, A, B, rank_mask, grad_mask, offsets, adapter, ctx.scale,
        need_dx, need_dA, need_dB,
    )  # fmt: skip
    return (
        dx if need_dx else None,
        dA if need_dA else None,
        dB if need_dB else None,
        None,
        None,
        None,
        None,
        None,
    )


masked_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ masked AdamW


@triton.jit
def _masked_adamw_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    mask_ptr,
    ema_ptr,
    unc_ptr,
    ss_ptr,
    bc2_ptr,
    numel,
    MAT,
    KDIM,
    R,
    decay,
    w1,
    beta2,
    one_m_beta2,
    eps,
    step_size,
    bc2_sqrt,
    ib1,
    one_m_ib1,
    ib2,
    one_m_ib2,
    RANK_DIM: tl.constexpr,
    LERP_HI: tl.constexpr,
    PER_SLOT: tl.constexpr,
    HAS_IMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One AdamW step on a contiguous ``[C, M, K]`` parameter and its state, in place, for the
    elements whose rank component (row for ``RANK_DIM=0``, column for 1) has mask 1. Masked
    elements are neither loaded nor stored."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    slot = offs // MAT
    within = offs - slot * MAT
    if RANK_DIM == 0:
        comp = within // KDIM
    else:
        comp = within % KDIM
    keep = tl.load(mask_ptr + slot * R + comp, mask=inb, other=0)
    act = inb & (keep != 0)
    p = tl.load(p_ptr + offs, mask=act, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=act, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=act, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=act, other=0.0).to(tl.float32)
    if PER_SLOT:
        ss = tl.load(ss_ptr + slot, mask=act, other=0.0)
        bc2 = tl.load(bc2_ptr + slot, mask=act, other=1.0)
    else:
        ss = step_size
        bc2 = bc2_sqrt
    if HAS_IMP:
        # HAFL sensitivity at the weights the gradient was taken at (before this step)
        sens = tl.abs(p * g)
        e = tl.load(ema_ptr + offs, mask=act, other=0.0).to(tl.float32)
        u = tl.load(unc_ptr + offs, mask=act, other=0.0).to(tl.float32)
        e = e * ib1 + sens * one_m_ib1
        u = u * ib2 + tl.abs(sens - e) * one_m_ib2
        tl.store(ema_ptr + offs, e.to(ema_ptr.dtype.element_ty), mask=act)
        tl.store(unc_ptr + offs, u.to(unc_ptr.dtype.element_ty), mask=act)
    # torch.optim.AdamW, op for op: decay, lerp, addcmul, sqrt / bc2 + eps, addcdiv
    p = p * decay
    if LERP_HI:
        m = g - (g - m) * (1.0 - w1)
    else:
        m = m + w1 * (g - m)
    v = v * beta2 + one_m_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2) + eps
    p = p + (-ss) * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=act)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=act)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=act)


@triton_op("fedlora::masked_adamw_", mutates_args={"param", "exp_avg", "exp_avg_sq", "ema", "unc"})
def masked_adamw_op(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor,
    ema: torch.Tensor | None,
    unc: torch.Tensor | None,
    step_size_t: torch.Tensor | None,
    bc2_sqrt_t: torch.Tensor | None,
    slots: int,
    rank_dim: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step_size: float,
    bc2_sqrt: float,
    imp_beta1: float,
    imp_beta2: float,
) -> None:
    """Launch the fused step. ``param`` and its state are contiguous, viewed as
    ``[slots, M, K]``; ``mask`` is ``[slots, R]`` int8. Per-slot bias terms come as float32
    tensors ``[slots]`` (``step_size_t``, ``bc2_sqrt_t``) or as the scalars."""
    numel = param.numel()
    if numel == 0:
        return
    mat = numel // slots
    kdim = param.shape[-1]
    rank = mask.shape[-1]
    per_slot = step_size_t is not None
    has_imp = ema is not None
    block = 1024
    w1 = 1.0 - beta1
    grid = (triton.cdiv(numel, block),)
    wrap_triton(_masked_adamw_kernel)[grid](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        mask,
        ema if has_imp else param,
        unc if has_imp else param,
        step_size_t if per_slot else mask,
        bc2_sqrt_t if per_slot else mask,
        numel,
        mat,
        kdim,
        rank,
        1.0 - lr * weight_decay,
        w1,
        beta2,
        1.0 - beta2,
        eps,
        step_size,
        bc2_sqrt,
        imp_beta1,
        1.0 - imp_beta1,
        imp_beta2,
        1.0 - imp_beta2,
        RANK_DIM=rank_dim,
        LERP_HI=w1 >= 0.5,
        PER_SLOT=per_slot,
        HAS_IMP=has_imp,
        BLOCK=block,
        num_warps=4,
    )
