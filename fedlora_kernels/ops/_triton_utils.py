"""Building blocks shared by the Triton ops (imported only by the ``_<op>_triton`` modules).

* ``@triton.jit`` helpers: the row tile of a program, its segments (:func:`tile_segments`,
  :func:`segment`, :func:`segment_rows`; constexpr ``SINGLE`` is the one-segment fast path that
  reads no table), and THE two tile loops every LoRA kernel is made of: :func:`shrink_tile`
  (``[BM, RP] += u @ W``, streaming the long dimension) and :func:`expand_tile` (``out (+)= t @
  W``, streaming the output columns), both with 64-bit row offsets and one dtype for both
  ``tl.dot`` operands;
* :func:`sum_partials`: the deterministic, fixed-order sum of per-(tile, segment) partial
  gradients into their adapter slots, with the owner matrix the segment plan
  (:class:`fedlora_kernels.RowSegments`) built once per batch;
* the tile choice of the row-tile kernels (:func:`row_tile_config`, a pure function of the
  shape: the AOT check of ``bench/aot_sm90.py`` replays it at the benchmark shapes);
* precision switches (:func:`dot_precision`, :func:`upcast_dots`);
* :func:`register`, the ONE way an op is registered with ``torch.library``, and :func:`launch`,
  the one way a kernel is launched (so :func:`record_launches` can list what the launchers
  would run, with which constexprs, without running it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fedlora_kernels._dispatch import interpreting

# ------------------------------------------------------------------------ @triton.jit blocks


@triton.jit
def row_tile(N, BM: tl.constexpr):
    """Rows ``[pid·BM, (pid+1)·BM)`` of this program (axis 0) and which of them exist."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    return rows, rows < N


@triton.jit
def tile_segments(tab_ptr, T, pid, SINGLE: tl.constexpr):
    """First and last segment overlapping row tile ``pid`` and the index of its first (tile,
    segment) pair, from the ``[3, T]`` table of :meth:`fedlora_kernels.RowSegments.tiles`;
    with ``SINGLE`` (one segment, the fast path) no table exists: ``(0, 0, pid)``."""
    if SINGLE:
        return 0, 0, pid
    else:
        lo = tl.load(tab_ptr + pid)
        hi = tl.load(tab_ptr + T + pid)
        p0 = tl.load(tab_ptr + 2 * T + pid)
        return lo, hi, p0


@triton.jit
def segment(off_ptr, slot_ptr, t, N, SINGLE: tl.constexpr):
    """Segment ``t``: its rows ``[start, end)`` and its adapter slot (int64). With ``SINGLE`` the
    one segment covers every row and the launcher has already offset the slot's pointers."""
    if SINGLE:
        return 0, N, 0
    else:
        start = tl.load(off_ptr + t)
        end = tl.load(off_ptr + t + 1)
        c = tl.load(slot_ptr + t).to(tl.int64)
        return start, end, c


@triton.jit
def segment_rows(off_ptr, slot_ptr, t, rows, N, SINGLE: tl.constexpr):
    """Which of ``rows`` belong to segment ``t``, and the segment's adapter slot (int64)."""
    start, end, c = segment(off_ptr, slot_ptr, t, N, SINGLE)
    return (rows >= start) & (rows < end), c


@triton.jit
def shrink_tile(
    acc,
    u_ptr,
    sum_,
    suk,
    rows64,
    rmask,
    w_ptr,
    wj,
    wk,
    jmask,
    D,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """THE shrink loop: ``acc [BM, RP] + u[rows, :D] @ W`` with ``W[k, j]`` at
    ``w_ptr + wj[j] + k·wk``, streaming ``D`` in steps of ``BK``.

    ``u`` (x or dy) has any strides; row offsets are 64-bit (``rows64``). Rows outside ``rmask``
    are neither read nor counted. Both ``tl.dot`` operands have ONE dtype: the weight's (the
    activation tile is cast to it: a bf16 ``dy`` against fp32 factors is computed in fp32), or
    fp32 for both under the interpreter (``UPCAST``)."""
    ks = tl.arange(0, BK)
    for k0 in range(0, D, BK):
        kk = k0 + ks
        kmask = kk < D
        ut = tl.load(
            u_ptr + rows64[:, None] * sum_ + kk[None, :] * suk,
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        wt = tl.load(
            w_ptr + wj[None, :] + kk[:, None].to(tl.int64) * wk,
            mask=jmask[None, :] & kmask[:, None],
            other=0.0,
        )
        if UPCAST:
            ut = ut.to(tl.float32)
            wt = wt.to(tl.float32)
        else:
            ut = ut.to(wt.dtype)
        acc = tl.dot(ut, wt, acc, input_precision=PREC)
    return acc


@triton.jit
def expand_tile(
    t,
    rows64,
    rmask,
    w_ptr,
    wj,
    wn,
    jmask,
    D,
    out_ptr,
    som,
    son,
    base_ptr,
    sbm,
    sbn,
    ADD: tl.constexpr,
    BN: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """THE expand loop: ``out[rows, n] = (base[rows, n] if ADD) + t @ W`` over ``n < D`` in
    steps of ``BN``, ``W[j, n]`` at ``w_ptr + wj[j] + n·wn``; ``t`` is the ``[BM, RP]`` float32
    rank tile. ``ADD`` accumulates into another output in the same pass (``base`` may be ``out``
    itself: in place), so no adapter-sized temporary exists. Row offsets are 64-bit; ``t`` is
    cast once to the weight's dtype (one dtype for both dot operands)."""
    if UPCAST:
        tc = t.to(tl.float32)
    else:
        tc = t.to(w_ptr.dtype.element_ty)
    ns = tl.arange(0, BN)
    for n0 in range(0, D, BN):
        nn = n0 + ns
        nmask = nn < D
        wt = tl.load(
            w_ptr + wj[:, None] + nn[None, :].to(tl.int64) * wn,
            mask=jmask[:, None] & nmask[None, :],
            other=0.0,
        )
        if UPCAST:
            wt = wt.to(tl.float32)
        y = tl.dot(tc, wt, input_precision=PREC)
        omask = rmask[:, None] & nmask[None, :]
        if ADD:
            base = tl.load(
                base_ptr + rows64[:, None] * sbm + nn[None, :] * sbn, mask=omask, other=0.0
            )
            y += base.to(tl.float32)
        tl.store(
            out_ptr + rows64[:, None] * som + nn[None, :] * son,
            y.to(out_ptr.dtype.element_ty),
            mask=omask,
        )


@triton.jit
def gemm_lora_kernel(
    a_ptr,
    w_ptr,
    bias_ptr,
    u_ptr,
    v_ptr,
    out_ptr,
    off_ptr,
    segslot_ptr,
    tab_ptr,
    M,
    N,
    K,
    T,
    sam,
    sak,
    swn,
    swk,
    som,
    son,
    svc,
    svh,
    svj,
    svn,
    scale,
    R: tl.constexpr,
    RP: tl.constexpr,
    RH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TB: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
    SINGLE: tl.constexpr,
    PREC: tl.constexpr,
):
    """The fused variant (``FEDLORA_FUSED_GEMM=1``): the base GEMM with the adapter's expand
    in its epilogue, ``out = a wᵀ (+ bias) + scale · u V_c`` for ``a`` ``[M, K]``, ``w[n, k]``
    at ``w_ptr + n·swn + k·swk`` (so ``W`` or ``Wᵀ``), ``u`` ``[M, R]`` float32 (the rank
    tile: ``T`` forward, ``dS`` backward) and ``V_c[j, n]`` at ``v_ptr + c·svc + (j // RH)·svh
    + (j % RH)·svj + n·svn`` (B_c, A_c, B_cat or A_cat), ``c`` the slot of the row's segment.

    The adapter then costs no pass over ``[M, N]`` at all: the ``[BM, RP] @ [RP, BN]`` product
    is added to the accumulator before the one store (LoRAFusion's design, DESIGN §8). Grouped
    tile order (``GROUP_M``) keeps ``w`` tiles in L2.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < M
    cmask = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + ks
        kmask = kk < K
        at = tl.load(
            a_ptr + rows64[:, None] * sam + kk[None, :] * sak,
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        wt = tl.load(
            w_ptr + cols64[None, :] * swn + kk[:, None].to(tl.int64) * swk,
            mask=cmask[None, :] & kmask[:, None],
            other=0.0,
        )
        if UPCAST:
            at = at.to(tl.float32)
            wt = wt.to(tl.float32)
        else:
            at = at.to(wt.dtype)
        acc = tl.dot(at, wt, acc, input_precision=PREC)

    # epilogue: + scale · u V_c, per segment of the row tile (one dtype for both operands)
    js = tl.arange(0, RP)
    jmask = js < R
    js64 = js.to(tl.int64)
    vj = (js64 // RH) * svh + (js64 % RH) * svj
    ut = tl.load(
        u_ptr + rows64[:, None] * R + js[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0
    )
    ut = ut * scale
    if SINGLE:
        seg_lo = 0
        seg_hi = 0
    else:  # the plan's table is for row tiles of TB rows: this tile covers BM // TB of them
        first = pid_m * (BM // TB)
        seg_lo = tl.load(tab_ptr + first)
        seg_hi = tl.load(tab_ptr + T + tl.minimum(first + BM // TB - 1, T - 1))
    for t in range(seg_lo, seg_hi + 1):
        inseg, c = segment_rows(off_ptr, segslot_ptr, t, rows, M, SINGLE)
        vt = tl.load(
            v_ptr + c * svc + vj[:, None] + cols64[None, :] * svn,
            mask=jmask[:, None] & cmask[None, :],
            other=0.0,
        )
        uu = tl.where(inseg[:, None], ut, 0.0)
        if UPCAST:
            vt = vt.to(tl.float32)
        else:
            uu = uu.to(vt.dtype)
        acc = tl.dot(uu, vt, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows64[:, None] * som + cols[None, :] * son,
        acc.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


# ------------------------------------------------------------------------------ host helpers


def alloc_output(
    shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill completely.

    Every launcher allocates the outputs its kernels must fully write through this function (by
    its name in the launcher's own module), so the tests can swap it for one that fills buffers
    with NaN and catch any unwritten element.
    """
    return torch.empty(shape, device=device, dtype=dtype)


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum) (``tl.dot`` needs tiles of at least 16)."""
    p = minimum
    while p < n:
        p *= 2
    return p


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on operands of ``dtype``.

    fp32 operands follow torch's own switch (``torch.backends.cuda.matmul.allow_tf32``, off by
    default), so our fp32 results match what ``F.linear`` would give on the same device.
    """
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def upcast_dots() -> bool:
    """Whether kernels must upcast ``tl.dot`` operands to fp32.

    The Triton interpreter returns garbage for low-precision ``tl.dot`` (DESIGN §3), so under it
    operands are converted to fp32 before every dot; on a GPU the native bf16/fp16 dot is used.
    """
    return interpreting()


#: streaming multiprocessors of the target GPU (H100 SXM / H200: 132); row tiles are sized so
#: that the grid covers them at the goal shapes
NUM_SMS = 132


def row_tile_config(n: int, d_in: int, d_out: int, rp: int, *, max_bm: int = 64) -> dict[str, int]:
    """Tiles of the row-tile kernels (one program per ``BM`` rows streaming ``d_in`` in ``BK``
    and ``d_out`` in ``BN`` columns) for ``n`` rows and padded rank ``rp``: the kernels' ``BM``,
    ``BK``, ``BN`` and the launch's ``num_warps``.

    ``BM`` is the largest of 64, 32, 16 (up to ``max_bm``; 16 from ``rp >= 128`` on) that still
    gives at least :data:`NUM_SMS` row tiles, so the grid fills the device: at N = 8192 that is
    32 (256 tiles, two resident per SM) where 64 left 4 of 132 SMs idle and one program per SM
    to hide latency. 8 warps share the ``[BM, RP]`` float32 accumulators once they reach 2048
    elements. The limits come from compiling every kernel for sm_90 at the benchmark shapes
    (``bench/aot_sm90.py``).
    """
    cap = min(max_bm, 16 if rp >= 128 else 64)
    bm = 16
    for cand in (64, 32):
        if cand <= cap and -(-n // cand) >= NUM_SMS:
            bm = cand
            break
    bk = 64 if rp <= 64 else 32
    bn = 64 if rp <= 64 else 32
    warps = 8 if bm * rp >= 2048 else 4
    return dict(BM=bm, BK=min(bk, next_pow2(d_in)), BN=min(bn, next_pow2(d_out)), num_warps=warps)


def fused_gemm(dtype: torch.dtype) -> bool:
    """Whether ops given a ``base_weight`` of ``dtype`` run the fused variant
    (``FEDLORA_FUSED_GEMM=1``): the base GEMM as :func:`gemm_lora_kernel` with the expand in its
    epilogue, instead of cuBLAS plus the in-place accumulation. Off by default until a GPU has
    measured it against cuBLAS (bench/README.md: the Triton GEMM must reach >= 95 % of cuBLAS
    for it to pay). Half precision only on a GPU: an fp32 Triton GEMM (no tensor cores at
    ``ieee`` precision) spills kilobytes on sm_90 (bench/results/aot-sm90.json), so fp32 keeps
    cuBLAS; the interpreter runs it in any dtype (that is how the tests check it)."""
    import os

    if os.environ.get("FEDLORA_FUSED_GEMM", "0") in ("", "0"):
        return False
    return dtype != torch.float32 or interpreting()


def gemm_config(m: int, n: int, k: int, rp: int) -> dict[str, int]:
    """Tiles of :func:`gemm_lora_kernel` (Hopper-friendly: 128x128x64, 4 stages, 8 warps; 64
    rows when few tiles would fill the 132 SMs otherwise)."""
    bm = 128 if -(-m // 128) * -(-n // 128) >= NUM_SMS else 64
    return dict(
        BM=bm, BN=min(128, max(16, next_pow2(n))),
        BK=min(64, max(16, next_pow2(k))), GROUP_M=8, num_warps=8 if bm == 128 else 4,
        num_stages=4 if rp <= 64 else 3,
    )  # fmt: skip


def launch_gemm_lora(
    a: torch.Tensor,
    w: torch.Tensor,
    w_transposed: bool,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    v: torch.Tensor,
    v_strides: tuple[int, int, int, int],
    rh: int,
    out: torch.Tensor,
    offsets: torch.Tensor | None,
    adapter: torch.Tensor | None,
    tiles: torch.Tensor | None,
    table_block: int,
    scale: float,
) -> torch.Tensor:
    """``out = a wᵀ (+ bias) + scale · u V_c`` (``w_transposed``: ``a w`` instead) through
    :func:`gemm_lora_kernel`; ``tiles`` is the segment plan's table for row tiles of
    ``table_block`` rows (a divisor of the GEMM's ``BM``; None: one segment, ``v`` already the
    slot's)."""
    m, k = a.shape
    n = out.shape[1]
    rank = u.shape[1]
    cfg = gemm_config(m, n, k, next_pow2(rank))
    swn, swk = (w.stride(1), w.stride(0)) if w_transposed else (w.stride(0), w.stride(1))
    single = tiles is None
    tb = table_block
    if cfg["BM"] % tb:
        raise ValueError(f"table block {table_block} does not divide the GEMM's BM {cfg['BM']}")
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    launch(
        gemm_lora_kernel,
        grid,
        a, w, bias if bias is not None else out, u, v, out, a if single else offsets,
        a if single else adapter, a if single else tiles, m, n, k, triton.cdiv(m, tb),
        *a.stride(), swn, swk, *out.stride(), *v_strides, scale,
        R=rank, RP=next_pow2(rank), RH=rh, HAS_BIAS=bias is not None, TB=tb,
        UPCAST=upcast_dots(), SINGLE=single, PREC=dot_precision(w.dtype), **cfg,
    )  # fmt: skip
    return out


def sum_partials(
    part: torch.Tensor, owner: torch.Tensor | None, num_slots: int, slot0: int
) -> torch.Tensor:
    """Per-slot sum of per-pair partials ``part`` ``[P, ...]`` (float32): ``owner @ part`` with
    the ``[C, P]`` owner matrix of :meth:`fedlora_kernels.RowSegments.owner` (a fixed-order
    sum: deterministic, no atomics), or, on the one-segment path (``owner`` None), the sum of
    every partial placed in slot ``slot0``."""
    if owner is None:
        total = part.sum(0, keepdim=True)
        if num_slots == 1:
            return total
        out = part.new_zeros((num_slots, *part.shape[1:]))
        out[slot0] = total[0]
        return out
    return (owner @ part.reshape(part.shape[0], -1)).reshape(num_slots, *part.shape[1:])


# ---------------------------------------------------------------------- registration, launch


def register(
    name: str,
    fn: Callable[..., Any],
    *,
    mutates_args: tuple[str, ...] | set[str] = (),
    backward: Callable[..., Any] | None = None,
    setup_context: Callable[..., Any] | None = None,
    opaque_shape: Callable[..., Any] | None = None,
) -> Any:
    """Register the launcher ``fn`` as the op ``name``: the one registration path of the package.

    Every op is a ``torch.library.triton_op`` (schema inferred from ``fn``'s annotations;
    in-place ops list what they write in ``mutates_args``), so ``torch.compile`` on GPU traces
    into its kernels; ``backward`` and ``setup_context`` go to ``register_autograd``.

    ``opaque_shape`` is for a launcher that cannot be traced (masked mean: it builds a device
    table of the clients' ``data_ptr()`` values, which fake tensors do not have): the op then
    stays one opaque node in compiled graphs (as ``torch.export`` keeps every ``triton_op``),
    with ``opaque_shape`` as its fake (shape-only) implementation.
    """
    op = triton_op(name, fn, mutates_args=mutates_args)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    if opaque_shape is not None:
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        op.register_fake(opaque_shape)
        op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
    return op


def _keep_opaque(mode: Any, op: Any, types: Any, args: Any, kwargs: Any) -> Any:
    """Functionalisation rule of an opaque op: no decomposition into its launcher's body."""
    return mode.__torch_dispatch__(op, types, args, kwargs)


class Launch(NamedTuple):
    """One kernel launch as a launcher issues it (see :func:`record_launches`)."""

    kernel: Any  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: dict[str, Any]  # constexprs and launch options (num_warps, ...)


_recording: list[list[Launch]] = []


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """``wrap_triton(kernel)[grid](*args, **meta)``, or only recorded inside
    :func:`record_launches`."""
    if _recording:
        _recording[-1].append(Launch(kernel, tuple(grid), args, meta))
        return
    wrap_triton(kernel)[grid](*args, **meta)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Within the block, :func:`launch` records launches instead of running them.

    Calling a launcher (the undecorated ``_<op>_triton`` functions) on ``meta`` tensors inside
    lists the kernels, grids, argument types and constexprs it would use for those shapes,
    with no device and no data: ``bench/aot_sm90.py`` compiles exactly these for sm_90.
    """
    calls: list[Launch] = []
    _recording.append(calls)
    try:
        yield calls
    finally:
        _recording.pop()
