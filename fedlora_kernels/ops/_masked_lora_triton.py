"""Triton kernels, launchers and autograd of :func:`fedlora_kernels.masked_lora`.

Registered through :func:`fedlora_kernels.ops._triton_utils.register` (a ``triton_op`` with
``register_autograd``, so ``torch.compile`` traces into them on GPU). Inputs arrive validated
from :mod:`fedlora_kernels.ops.masked_lora`; see that module for the algorithm.

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

from fedlora_kernels.ops._triton_utils import (
    alloc_output,
    dot_precision,
    launch,
    next_pow2,
    pair_slots,
    register,
    row_tile,
    row_tile_config,
    segment,
    segment_rows,
    segment_slot_dot,
    segment_tiles,
    sum_partials_by_slot,
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
    rm_ptr, off_ptr, slot_ptr, rows, js, seg_lo, seg_hi, R: tl.constexpr, BM: tl.constexpr,
    RP: tl.constexpr,
):  # fmt: skip
    """Per-row rank mask ``[BM, RP]``: row n of segment t gets ``rank_mask[t]``."""
    M = tl.zeros([BM, RP], dtype=tl.float32)
    for t in range(seg_lo, seg_hi + 1):
        inseg, _ = segment_rows(off_ptr, slot_ptr, t, rows)
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
    rows, rmask = row_tile(N, BM)
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
        a_off = js[None, :] * D_IN + kk[:, None]
        a_mask = jmask[None, :] & kmask[:, None]
        acc = segment_slot_dot(
            acc, xt, rows, a_ptr, a_off, a_mask, D_IN, off_ptr, segslot_ptr, seg_lo, seg_hi,
            R, UPCAST, PREC,
        )  # fmt: skip

    # mask: T = S ⊙ m_t, kept (unscaled, float32) for the dB reduction
    T = acc
    if HAS_RM:
        T = T * _row_mask(rm_ptr, off_ptr, segslot_ptr, rows, js, seg_lo, seg_hi, R, BM, RP)
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
        b_off = nn[None, :] * R + js[:, None]
        b_mask = jmask[:, None] & nmask[None, :]
        y = segment_slot_dot(
            tl.zeros([BM, BN], dtype=tl.float32), Tc, rows, b_ptr, b_off, b_mask, D_OUT,
            off_ptr, segslot_ptr, seg_lo, seg_hi, R, UPCAST, PREC,
        )  # fmt: skip
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
    rows, rmask = row_tile(N, BM)
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
        b_off = nn[:, None] * R + js[None, :]
        b_mask = nmask[:, None] & jmask[None, :]
        P = segment_slot_dot(
            P, dyt, rows, b_ptr, b_off, b_mask, D_OUT, off_ptr, segslot_ptr, seg_lo, seg_hi,
            R, UPCAST, PREC,
        )  # fmt: skip

    # dS = scale · P ⊙ m_t: kept for the dA reduction
    dS = P * scale
    if HAS_RM:
        dS = dS * _row_mask(rm_ptr, off_ptr, segslot_ptr, rows, js, seg_lo, seg_hi, R, BM, RP)
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
            a_off = js[:, None] * D_IN + kk[None, :]
            a_mask = jmask[:, None] & kmask[None, :]
            dx = segment_slot_dot(
                tl.zeros([BM, BK], dtype=tl.float32), dSc, rows, a_ptr, a_off, a_mask, D_IN,
                off_ptr, segslot_ptr, seg_lo, seg_hi, R, UPCAST, PREC,
            )  # fmt: skip
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
        start, end, c = segment(off_ptr, segslot_ptr, t)
        K = tl.load(cnt_ptr + c)
        if rb * RB < K:
            jv = jr < K
            jj = tl.load(kidx_ptr + c * R + jr, mask=jv, other=0)
            r_lo = tl.maximum(start.to(tl.int32), ch_lo)
            r_hi = tl.minimum(end.to(tl.int32), ch_hi)
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


def reduce_config(n: int, d: int, rp: int) -> dict[str, int]:
    """Tiles of the gradient reduction over ``n`` rows and ``d`` columns at padded rank ``rp``:
    rank block ``RB`` (the granularity at which frozen components are skipped), rows per step
    ``BM``, columns per program ``BD``, rows per chunk ``CH`` (a runtime argument) and
    ``num_warps``. About 8 row chunks (at least one BM each) give the grid enough programs
    without a big partial buffer.
    """
    rb = 16 if rp <= 32 else 32
    bm = 64 if n >= 4096 else 32
    bd = min(64, next_pow2(d))
    chunk = -(-max(n, 1) // 8)
    chunk = -(-chunk // bm) * bm
    return dict(RB=rb, BM=bm, BD=bd, CH=chunk, num_warps=4)


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
    cfg = reduce_config(n, d, next_pow2(rank))
    chunk = cfg.pop("CH")
    plan = segment_tiles(offsets, n, chunk)
    if transpose_out:
        part = alloc_partials((plan.max_pairs, rank, d), device=u.device)
        spd, spj = 1, d
    else:
        part = alloc_partials((plan.max_pairs, d, rank), device=u.device)
        spd, spj = rank, 1
    n_chunks = max(1, -(-n // chunk))
    launch(
        _ml_reduce_kernel,
        (triton.cdiv(rank, cfg["RB"]), triton.cdiv(d, cfg["BD"]), n_chunks),
        u, v, part, kidx, cnt, offsets, adapter, plan.lo, plan.hi, plan.pair_start,
        n, d, *u.stride(), part.stride(0), spd, spj, chunk,
        R=rank, UPCAST=upcast_dots(), PREC=dot_precision(u.dtype), **cfg,
    )  # fmt: skip
    return sum_partials_by_slot(part, pair_slots(plan, adapter), num_slots)


def _forward(
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
    cfg = row_tile_config(n, d_in, d_out, rp)
    plan = segment_tiles(offsets, n, cfg["BM"])
    launch(
        _ml_fwd_kernel,
        (triton.cdiv(n, cfg["BM"]),),
        x, A.contiguous(), B.contiguous(), rank_mask if rank_mask is not None else T, y, T,
        offsets, adapter, plan.lo, plan.hi, n, d_in, d_out, *x.stride(), *y.stride(), scale,
        R=rank, RP=rp, HAS_RM=rank_mask is not None, UPCAST=upcast_dots(),
        PREC=dot_precision(x.dtype), **cfg,
    )  # fmt: skip
    return y, T


def _backward_kernels(
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
        cfg = row_tile_config(n, d_in, d_out, rp)
        plan = segment_tiles(offsets, n, cfg["BM"])
        launch(
            _ml_bwd_rows_kernel,
            (triton.cdiv(n, cfg["BM"]),),
            dy, A, B, rank_mask if rank_mask is not None else T, dx if need_dx else dy, dS,
            offsets, adapter, plan.lo, plan.hi, n, d_in, d_out, *dy.stride(),
            *(dx.stride() if need_dx else (0, 0)), scale,
            R=rank, RP=rp, HAS_RM=rank_mask is not None, WRITE_DX=need_dx, WRITE_DS=need_dA,
            UPCAST=upcast_dots(), PREC=dot_precision(dy.dtype), **cfg,
        )  # fmt: skip
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


masked_lora_bwd = register("fedlora::masked_lora_bwd", _backward_kernels)
masked_lora_fwd = register(
    "fedlora::masked_lora_fwd", _forward, backward=_backward, setup_context=_setup_context
)
