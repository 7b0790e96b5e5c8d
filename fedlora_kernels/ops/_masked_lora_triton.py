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
    expand_tile,
    fused_gemm,
    launch,
    launch_gemm_lora,
    next_pow2,
    register,
    row_tile,
    row_tile_config,
    segment,
    segment_rows,
    shrink_tile,
    sum_partials,
    tile_segments,
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
def _ml_fwd_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    rm_ptr,
    y_ptr,
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
    R: tl.constexpr,
    RP: tl.constexpr,
    HAS_RM: tl.constexpr,
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
    a_rows = js64 * D_IN  # A_c [R, D_IN]
    seg_lo, seg_hi, _ = tile_segments(tab_ptr, T, pid, SINGLE)

    # shrink + mask, per segment of the tile: T[n] = (x[n] A_cᵀ) ⊙ m_t. The segment loop sits
    # OUTSIDE the streaming loop (each pass of shrink_tile is a plain pipelined K loop); only a
    # tile straddling a segment boundary runs it twice, each time over its own rows of x.
    Tt = tl.zeros([BM, RP], dtype=tl.float32)
    for t in range(seg_lo, seg_hi + 1):
        inseg, c = segment_rows(off_ptr, segslot_ptr, t, rows, N, SINGLE)
        acc = tl.zeros([BM, RP], dtype=tl.float32)
        acc = shrink_tile(
            acc, x_ptr, sxm, sxk, rows64, rmask & inseg, a_ptr + c * R * D_IN, a_rows, 1, jmask,
            D_IN, BK, UPCAST, PREC,
        )  # fmt: skip
        if HAS_RM:
            mt = tl.load(rm_ptr + t * R + js, mask=jmask, other=0.0)
            acc = acc * mt[None, :]
        Tt = tl.where(inseg[:, None], acc, Tt)
    # T kept (unscaled, float32) for the dB reduction
    tl.store(t_ptr + rows64[:, None] * R + js[None, :], Tt, mask=rmask[:, None] & jmask[None, :])

    # expand: y[n] = (base[n] +) scale · T[n] B_cᵀ, streamed over d_out (B_c [D_OUT, R]);
    # EXPAND off: the fused variant adds it in the base GEMM's epilogue instead
    if EXPAND:
        for t in range(seg_lo, seg_hi + 1):
            inseg, c = segment_rows(off_ptr, segslot_ptr, t, rows, N, SINGLE)
            expand_tile(
                Tt * scale, rows64, rmask & inseg, b_ptr + c * D_OUT * R, js64, R, jmask, D_OUT,
                y_ptr, sym, syn, base_ptr, sbm, sbn, ADD_BASE, BN, UPCAST, PREC,
            )  # fmt: skip


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
    R: tl.constexpr,
    RP: tl.constexpr,
    HAS_RM: tl.constexpr,
    WRITE_DX: tl.constexpr,
    WRITE_DS: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    UPCAST: tl.constexpr,
    ADD_DX: tl.constexpr,
    SINGLE: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, rmask = row_tile(N, BM)
    rows64 = rows.to(tl.int64)
    js = tl.arange(0, RP)
    jmask = js < R
    js64 = js.to(tl.int64)
    a_rows = js64 * D_IN
    seg_lo, seg_hi, _ = tile_segments(tab_ptr, T, pid, SINGLE)

    # dS[n] = scale · (dy[n] B_c) ⊙ m_t  (dy read once, any strides)
    dS = tl.zeros([BM, RP], dtype=tl.float32)
    for t in range(seg_lo, seg_hi + 1):
        inseg, c = segment_rows(off_ptr, segslot_ptr, t, rows, N, SINGLE)
        P = tl.zeros([BM, RP], dtype=tl.float32)
        P = shrink_tile(
            P, dy_ptr, sdym, sdyn, rows64, rmask & inseg, b_ptr + c * D_OUT * R, js64, R, jmask,
            D_OUT, BN, UPCAST, PREC,
        )  # fmt: skip
        P = P * scale
        if HAS_RM:
            mt = tl.load(rm_ptr + t * R + js, mask=jmask, other=0.0)
            P = P * mt[None, :]
        dS = tl.where(inseg[:, None], P, dS)
    if WRITE_DS:  # kept for the dA reduction
        tl.store(
            ds_ptr + rows64[:, None] * R + js[None, :], dS, mask=rmask[:, None] & jmask[None, :]
        )

    # dx[n] (+)= dS[n] A_c, streamed over d_in
    if WRITE_DX:
        for t in range(seg_lo, seg_hi + 1):
            inseg, c = segment_rows(off_ptr, segslot_ptr, t, rows, N, SINGLE)
            expand_tile(
                dS, rows64, rmask & inseg, a_ptr + c * R * D_IN, a_rows, 1, jmask, D_IN, dx_ptr,
                sdxm, sdxk, dx_ptr, sdxm, sdxk, ADD_DX, BK, UPCAST, PREC,
            )  # fmt: skip


@triton.jit
def _ml_reduce_kernel(
    u_ptr,
    v_ptr,
    part_ptr,
    kidx_ptr,
    cnt_ptr,
    off_ptr,
    segslot_ptr,
    tab_ptr,
    N,
    NCH,
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
    SINGLE: tl.constexpr,
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
    seg_lo, seg_hi, pair0 = tile_segments(tab_ptr, NCH, pc, SINGLE)
    jr = rb * RB + tl.arange(0, RB)
    ms = tl.arange(0, BM)
    for t in range(seg_lo, seg_hi + 1):
        start, end, c = segment(off_ptr, segslot_ptr, t, N, SINGLE)
        K = tl.load(cnt_ptr + c)
        if rb * RB < K:
            jv = jr < K
            jj = tl.load(kidx_ptr + c * R + jr, mask=jv, other=0)
            if SINGLE:
                r_lo = ch_lo
                r_hi = ch_hi
            else:
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
                else:  # one dtype for both operands: u's (dy's or x's, which may differ)
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
    adapter: torch.Tensor | None,
    num_slots: int,
    rank: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which components of each slot need a gradient, as ``(kidx [C, R] int32, cnt [C] int32)``.

    A component needs one when ``grad_mask`` lets it train AND some segment of the slot uses it
    (rank mask 1): a component truncated away everywhere, or a slot no segment uses, has a zero
    gradient and is skipped like a frozen one. ``kidx[c, :cnt[c]]`` lists those components in
    increasing order (the rest of the row is the others). Computed on device, no host sync.
    ``adapter`` None is the one-segment path: ``grad_mask`` and ``rank_mask`` are then the one
    slot's rows (``[1, R]``) and so is the plan.
    """
    if adapter is None:
        need = torch.ones(1, rank, device=device, dtype=torch.bool)
        if rank_mask is not None:
            need = need & (rank_mask[:1] != 0)
    else:
        uses = (
            rank_mask if rank_mask is not None else torch.ones(adapter.numel(), rank, device=device)
        )
        used = torch.zeros(num_slots, rank, device=device, dtype=torch.float32)
        used = used.index_add(0, adapter, uses.to(torch.float32))
        need = used > 0
    if grad_mask is not None:
        need = need & (grad_mask != 0)
    kidx = torch.argsort((~need).to(torch.int32), dim=1, stable=True).to(torch.int32)
    cnt = need.sum(dim=1).to(torch.int32)
    return kidx.contiguous(), cnt


def tile_configs(n: int, d_in: int, d_out: int, rank: int) -> tuple[dict, dict]:
    """``(row tiles, reduction)`` configs for ``n`` rows (pure functions of the shape: the op
    asks its segment plan for the tables of exactly these row tiles and row chunks)."""
    rp = next_pow2(rank)
    return row_tile_config(n, d_in, d_out, rp), reduce_config(n, max(d_in, d_out), rp)


def _reduce(
    u: torch.Tensor,
    v: torch.Tensor,
    kidx: torch.Tensor,
    cnt: torch.Tensor,
    offsets: torch.Tensor | None,
    adapter: torch.Tensor | None,
    tiles: torch.Tensor | None,
    owner: torch.Tensor | None,
    slot0: int,
    num_slots: int,
    transpose_out: bool,
) -> torch.Tensor:
    """Per-slot ``Σ_rows uᵀ v`` over the trainable components: ``[C, D, R]`` (or ``[C, R, D]``
    with ``transpose_out``), float32, exactly zero for the other components."""
    n, d = u.shape
    rank = v.shape[1]
    cfg = reduce_config(n, d, next_pow2(rank))
    chunk = cfg.pop("CH")
    n_chunks = max(1, -(-n // chunk))
    single = tiles is None
    pairs = n_chunks if single else owner.shape[1]
    if transpose_out:
        part = alloc_partials((pairs, rank, d), device=u.device)
        spd, spj = 1, d
    else:
        part = alloc_partials((pairs, d, rank), device=u.device)
        spd, spj = rank, 1
    launch(
        _ml_reduce_kernel,
        (triton.cdiv(rank, cfg["RB"]), triton.cdiv(d, cfg["BD"]), n_chunks),
        u, v, part, kidx, cnt, u if single else offsets, u if single else adapter,
        u if single else tiles, n, n_chunks, d, *u.stride(), part.stride(0), spd, spj, chunk,
        R=rank, UPCAST=upcast_dots(), SINGLE=single, PREC=dot_precision(u.dtype), **cfg,
    )  # fmt: skip
    return sum_partials(part, owner, num_slots, slot0)


def _single(A: torch.Tensor, B: torch.Tensor, slot0: int, tiles: torch.Tensor | None):
    """One-segment path: the slot's own factors (views), no table."""
    if tiles is None:
        return A[slot0], B[slot0]
    return A, B


def _forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    rank_mask: torch.Tensor | None,
    grad_mask: torch.Tensor | None,
    offsets: torch.Tensor | None,
    adapter: torch.Tensor | None,
    tiles: torch.Tensor | None,
    tiles_red: torch.Tensor | None,
    owner_red: torch.Tensor | None,
    slot0: int,
    scale: float,
    base_out: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: returns ``(y [N, d_out], T [N, R] float32)``; ``T = (x A_cᵀ) ⊙ m_t`` is saved
    for backward. ``grad_mask`` is unused here; it is an input so backward can see it.

    With ``base_weight`` (and ``base_bias``) the op computes the frozen base layer itself
    (cuBLAS) and accumulates the adapter into it in place; backward then adds the adapter's
    input gradient into ``dy W`` in the kernel's pass over ``dx`` (no separate add).

    ``tiles`` (``[3, T]``, the row tiles'), ``tiles_red`` and ``owner_red`` (the gradient
    reduction's row chunks) come from the batch's :class:`fedlora_kernels.RowSegments`; all
    None: one segment using slot ``slot0`` (nothing planned, nothing read). With ``base_out``
    the kernel returns ``base_out + adapter`` in ``base_out``'s dtype, in the same pass."""
    n, d_in = x.shape
    _, rank, _ = A.shape
    d_out = B.shape[1]
    rp = next_pow2(rank)
    out_dtype = base_out.dtype if base_out is not None else x.dtype
    fused = base_weight is not None and fused_gemm(base_weight.dtype)
    if fused:  # the base GEMM with the expand in its epilogue (after the shrink below)
        y = alloc_output((n, d_out), device=x.device, dtype=x.dtype)
    elif base_weight is not None:  # the base layer itself; the adapter is added in place
        y = torch.nn.functional.linear(x, base_weight, base_bias)
        base_out = y
    else:
        y = alloc_output((n, d_out), device=x.device, dtype=out_dtype)
    T = alloc_output((n, rank), device=x.device, dtype=torch.float32)
    if n == 0:
        return y, T
    base = base_out if base_out is not None else y  # unread when ADD_BASE is off
    cfg, _ = tile_configs(n, d_in, d_out, rank)
    single = tiles is None
    Ak, Bk = _single(A, B, slot0, tiles)
    num_tiles = triton.cdiv(n, cfg["BM"])
    launch(
        _ml_fwd_kernel,
        (num_tiles,),
        x, Ak.contiguous(), Bk.contiguous(), rank_mask if rank_mask is not None else T, y, T,
        base, x if single else offsets, x if single else adapter, x if single else tiles,
        n, num_tiles, d_in, d_out, *x.stride(), *y.stride(), *base.stride(), scale,
        R=rank, RP=rp, HAS_RM=rank_mask is not None, UPCAST=upcast_dots(),
        ADD_BASE=base_out is not None, SINGLE=single, PREC=dot_precision(A.dtype),
        EXPAND=not fused, **cfg,
    )  # fmt: skip
    if fused:  # y = x Wᵀ + b + scale · T B_cᵀ; B_c[n, j] -> V[j, n]: slot R·d_out, j 1, n R
        launch_gemm_lora(
            x, base_weight, False, base_bias, T, Bk.contiguous(), (d_out * rank, 0, 1, rank),
            rank, y, offsets, adapter, tiles, cfg["BM"], scale,
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
    offsets: torch.Tensor | None,
    adapter: torch.Tensor | None,
    tiles: torch.Tensor | None,
    tiles_red: torch.Tensor | None,
    owner_red: torch.Tensor | None,
    slot0: int,
    scale: float,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    base_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: returns ``(dx, dA, dB)``; a gradient that is not needed comes back empty.

    ``dy`` may have any strides (even 0) and its own dtype (``base_out``'s); ``dx`` comes in
    ``x``'s. ``dA``/``dB`` are exactly zero on the components ``grad_mask`` freezes, and no work
    is spent on them.
    """
    n, d_in = x.shape
    num_slots, rank, _ = A.shape
    d_out = B.shape[1]
    rp = next_pow2(rank)
    device = dy.device
    empty = torch.empty(0, device=device, dtype=x.dtype)
    fused = need_dx and base_weight is not None and fused_gemm(base_weight.dtype)
    if not need_dx:
        dx = empty
    elif fused:  # dx = dy W + dS A_c, the adapter's part in the GEMM's epilogue
        dx = alloc_output((n, d_in), device=device, dtype=x.dtype)
    elif base_weight is not None:  # the whole input gradient: dy W (cuBLAS) += dS A_c (kernel)
        dx = torch.mm(dy.to(base_weight.dtype), base_weight).to(x.dtype)
    else:
        dx = alloc_output((n, d_in), device=device, dtype=x.dtype)
    dA = torch.zeros_like(A) if need_dA else torch.empty(0, device=device, dtype=A.dtype)
    dB = torch.zeros_like(B) if need_dB else torch.empty(0, device=device, dtype=B.dtype)
    if n == 0:
        return dx, dA, dB
    single = tiles is None
    Ak, Bk = _single(A, B, slot0, tiles)
    Ak, Bk = Ak.contiguous(), Bk.contiguous()
    write_ds = need_dA or fused
    dS = alloc_output((n, rank), device=device, dtype=torch.float32) if write_ds else T
    if need_dx or need_dA:
        cfg, _ = tile_configs(n, d_in, d_out, rank)
        num_tiles = triton.cdiv(n, cfg["BM"])
        launch(
            _ml_bwd_rows_kernel,
            (num_tiles,),
            dy, Ak, Bk, rank_mask if rank_mask is not None else T, dx if need_dx else dy, dS,
            dy if single else offsets, dy if single else adapter, dy if single else tiles,
            n, num_tiles, d_in, d_out, *dy.stride(), *(dx.stride() if need_dx else (0, 0)),
            scale, R=rank, RP=rp, HAS_RM=rank_mask is not None, WRITE_DX=need_dx and not fused,
            WRITE_DS=write_ds, UPCAST=upcast_dots(), ADD_DX=base_weight is not None,
            SINGLE=single,
            PREC=dot_precision(A.dtype), **cfg,
        )  # fmt: skip
        if fused:  # dx = dy W + dS A_c: A_c[j, k] -> V[j, k]: slot R·d_in, j d_in, k 1
            launch_gemm_lora(
                dy, base_weight, True, None, dS, Ak, (rank * d_in, 0, d_in, 1), rank, dx,
                offsets, adapter, tiles, cfg["BM"], 1.0,
            )  # fmt: skip
    if need_dA or need_dB:
        if single:
            gm = grad_mask[slot0 : slot0 + 1] if grad_mask is not None else None
            kidx, cnt = grad_plan(gm, rank_mask, None, 1, rank, device)
        else:
            kidx, cnt = grad_plan(grad_mask, rank_mask, adapter, num_slots, rank, device)
        red = (offsets, adapter, tiles_red, owner_red, slot0, num_slots)
        if need_dB:
            dB = (_reduce(dy, T, kidx, cnt, *red, False) * scale).to(B.dtype)
        if need_dA:
            dA = _reduce(x, dS, kidx, cnt, *red, True).to(A.dtype)
    return dx, dA, dB


def _setup_context(ctx, inputs, output):
    (x, A, B, rank_mask, grad_mask, offsets, adapter, tiles, tiles_red, owner_red, slot0, scale,
     base_out, base_weight, _bias) = inputs  # fmt: skip
    _, T = output
    ctx.save_for_backward(
        x, T, A, B, rank_mask, grad_mask, offsets, adapter, tiles, tiles_red, owner_red,
        base_weight,
    )  # fmt: skip
    ctx.scale, ctx.slot0, ctx.has_base = scale, slot0, base_out is not None


def _backward(ctx, dy, _dT):
    (x, T, A, B, rank_mask, grad_mask, offsets, adapter, tiles, tiles_red, owner_red,
     base_weight) = ctx.saved_tensors  # fmt: skip
    need_dx, need_dA, need_dB = ctx.needs_input_grad[:3]
    dx, dA, dB = masked_lora_bwd(
        dy, x, T, A, B, rank_mask, grad_mask, offsets, adapter, tiles, tiles_red, owner_red,
        ctx.slot0, ctx.scale, need_dx, need_dA, need_dB, base_weight,
    )  # fmt: skip
    d_base = dy if ctx.has_base else None  # y = base_out + adapter: identity to base_out
    # the frozen base weight and bias get no gradient (the public op refuses trainable ones)
    return (
        dx if need_dx else None,
        dA if need_dA else None,
        dB if need_dB else None,
        *([None] * 9),
        d_base,
        None,
        None,
    )


masked_lora_bwd = register("fedlora::masked_lora_bwd", _backward_kernels)
masked_lora_fwd = register(
    "fedlora::masked_lora_fwd", _forward, backward=_backward, setup_context=_setup_context
)
