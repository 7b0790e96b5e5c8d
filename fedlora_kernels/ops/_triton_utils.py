"""Building blocks shared by the Triton ops (imported only by the ``_<op>_triton`` modules).

* ``@triton.jit`` helpers: the row tile of a program, the segment loop's per-segment row range
  and slot (:func:`segment`, :func:`segment_rows`) and the segment-wise slot matmul
  (:func:`segment_slot_dot`) that every row-tile kernel of a multi-slot adapter runs;
* the host side of the segment loop: :func:`segment_tiles` (which segments each row tile or
  row chunk overlaps) and :func:`sum_partials_by_slot` (the deterministic, fixed-order sum of
  per-(tile, segment) partials into their adapter slots);
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
def segment(off_ptr, slot_ptr, t):
    """Segment ``t``: its rows ``[start, end)`` and its adapter slot (int64)."""
    start = tl.load(off_ptr + t)
    end = tl.load(off_ptr + t + 1)
    c = tl.load(slot_ptr + t).to(tl.int64)
    return start, end, c


@triton.jit
def segment_rows(off_ptr, slot_ptr, t, rows):
    """Which of ``rows`` belong to segment ``t``, and the segment's adapter slot (int64)."""
    start, end, c = segment(off_ptr, slot_ptr, t)
    return (rows >= start) & (rows < end), c


@triton.jit
def segment_slot_dot(
    acc,
    u,
    rows,
    w_ptr,
    w_off,
    w_mask,
    D,
    off_ptr,
    slot_ptr,
    seg_lo,
    seg_hi,
    R: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """``acc + Σ_t u[rows of segment t] @ W_c(t)``: the segment loop of a multi-slot matmul.

    ``u`` is a ``[BM, K]`` tile of the program's rows; the weight tile of slot ``c`` is loaded
    from ``w_ptr + c·R·D + w_off`` (slot matrices of ``R·D`` elements) under ``w_mask``. Rows of
    other segments enter as zeros, so every row is multiplied by its own slot's weights; the
    segments are visited in order (the accumulation order never depends on the data).
    """
    for t in range(seg_lo, seg_hi + 1):
        inseg, c = segment_rows(off_ptr, slot_ptr, t, rows)
        w = tl.load(w_ptr + c * R * D + w_off, mask=w_mask, other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        us = tl.where(inseg[:, None], u, tl.zeros_like(u))
        acc = tl.dot(us, w, acc, input_precision=PREC)
    return acc


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


def row_tile_config(n: int, d_in: int, d_out: int, rp: int, *, max_bm: int = 64) -> dict[str, int]:
    """Tiles of the row-tile kernels (one program per ``BM`` rows streaming ``d_in`` in ``BK``
    and ``d_out`` in ``BN`` columns) for ``n`` rows and padded rank ``rp``: the kernels' ``BM``,
    ``BK``, ``BN`` and the launch's ``num_warps``.

    ``BM`` grows with ``n`` (enough row tiles to fill the device) up to ``max_bm`` (a kernel
    holding more live tiles asks for less), and stays 16 from ``rp >= 128`` on; 8 warps share
    the ``[BM, RP]`` float32 accumulators once they reach 2048 elements. The limits come from
    compiling every kernel for sm_90 at the benchmark shapes (``bench/aot_sm90.py``): with them
    no kernel spills registers there, except the multi-head backward at ``rp = 128``.
    """
    bm = 64 if n >= 8192 else (32 if n >= 1024 else 16)
    bm = min(bm, max_bm, 16 if rp >= 128 else 64)
    bk = 64 if rp <= 64 else 32
    bn = 64 if rp <= 64 else 32
    warps = 8 if bm * rp >= 2048 else 4
    return dict(BM=bm, BK=min(bk, next_pow2(d_in)), BN=min(bn, next_pow2(d_out)), num_warps=warps)


class SegmentPlan(NamedTuple):
    """Which segments each block of rows overlaps (see :func:`segment_tiles`)."""

    lo: torch.Tensor  # int32 [blocks]: first segment overlapping the block
    hi: torch.Tensor  # int32 [blocks]: last segment overlapping the block (inclusive)
    pair_start: torch.Tensor  # int32 [blocks]: index of the block's first (block, segment) pair
    max_pairs: int  # upper bound on the number of (block, segment) pairs


def segment_tiles(offsets: torch.Tensor, num_rows: int, block_m: int) -> SegmentPlan:
    """Plan of which segments each row block overlaps, computed without a host sync.

    Block ``m`` covers rows ``[m*block_m, (m+1)*block_m)``. The plan gives, per block, the first
    and last overlapping segment and the index of its first (block, segment) pair, plus an upper
    bound on the number of pairs (``num_blocks + S - 1``: every segment boundary inside a block
    adds one pair). Reductions write one partial per pair, so every partial has one owner and
    sums stay deterministic (:func:`sum_partials_by_slot`); unused pair rows stay zero.
    """
    device = offsets.device
    num_segs = offsets.numel() - 1
    num_tiles = max(1, -(-num_rows // block_m))
    starts = torch.arange(num_tiles, device=device, dtype=torch.int64) * block_m
    ends = torch.clamp(starts + block_m, max=max(num_rows, 1)) - 1
    seg_ends = offsets[1:].contiguous()
    lo = torch.searchsorted(seg_ends, starts, right=True).clamp_max(num_segs - 1)
    hi = torch.searchsorted(seg_ends, ends, right=True).clamp_max(num_segs - 1)
    counts = hi - lo + 1
    pair_start = torch.cumsum(counts, 0) - counts
    i32 = torch.int32
    return SegmentPlan(lo.to(i32), hi.to(i32), pair_start.to(i32), num_tiles + num_segs - 1)


def pair_slots(plan: SegmentPlan, adapter: torch.Tensor) -> torch.Tensor:
    """Adapter slot of every (block, segment) pair of ``plan``, ``-1`` for unused pair rows."""
    lo, hi, pair_start, max_pairs = plan
    device = adapter.device
    counts = hi - lo + 1
    pair_ids = torch.arange(max_pairs, device=device)
    # pair p belongs to block k with pair_start[k] <= p < pair_start[k] + counts[k]
    block_of = torch.searchsorted((pair_start + counts).to(torch.int64), pair_ids, right=True)
    valid = block_of < lo.numel()
    block_of = block_of.clamp_max(lo.numel() - 1)
    seg_of = lo[block_of].to(torch.int64) + (pair_ids - pair_start[block_of].to(torch.int64))
    seg_of = seg_of.clamp(0, adapter.numel() - 1)
    unused = torch.full((max_pairs,), -1, device=device, dtype=torch.int64)
    return torch.where(valid, adapter[seg_of], unused)


def sum_partials_by_slot(part: torch.Tensor, slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Per-slot sum of per-pair partials ``part`` ``[P, ...]`` (float32), pair ``p`` belonging to
    slot ``slots[p]``: ``[num_slots, ...]``. A small owner-matrix matmul ``[C, P] @ [P, ·]``, so
    the order of the sum is fixed (deterministic, no atomics)."""
    owner = (slots[None, :] == torch.arange(num_slots, device=part.device)[:, None]).to(
        torch.float32
    )
    out = owner @ part.reshape(part.shape[0], -1)
    return out.reshape(num_slots, *part.shape[1:])


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
