"""Helpers shared by the Triton launchers: tile plans over segments, precision switches."""

from __future__ import annotations

import torch

from fedlora_kernels._dispatch import interpreting


def alloc_output(
    shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill completely.

    Every launcher allocates the outputs its kernels must fully write through this function, so
    the tests can swap it for one that fills buffers with NaN and catch any unwritten element.
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


def segment_tiles(
    offsets: torch.Tensor, num_rows: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Plan of which segments each row tile overlaps, computed without a host sync.

    Row tile ``m`` covers rows ``[m*block_m, (m+1)*block_m)``. Returns int32 tensors ``tile_lo``
    and ``tile_hi`` (first and last segment overlapping the tile, inclusive) and ``tile_pair``
    (index of the tile's first (tile, segment) pair), plus an upper bound on the number of pairs
    (``num_tiles + S - 1``: every segment boundary inside a tile adds one pair). Backward kernels
    write one partial reduction per pair, so every partial has one owner and sums stay
    deterministic; unused pair rows stay zero.
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
    return lo.to(i32), hi.to(i32), pair_start.to(i32), num_tiles + num_segs - 1
