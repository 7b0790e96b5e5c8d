"""Triton kernel, launcher and registration of :func:`fedlora_kernels.masked_weighted_mean`.

Kernel: one program per block of the flattened output ``[pre, R, post]``; it loops over the
clients in order, accumulating ``coef[k, j] · X_k`` in float32 per element (deterministic: every
element is summed in client order by one program, no atomics). The clients are reached through a
device table of ``(data_ptr, r_k, stride_pre, stride_rank, stride_post)`` rows, so each client is
read in place whatever its rank and strides. Kernel and torch reference use bitwise the same
coefficients (formed by :mod:`fedlora_kernels.ops.masked_mean`) and the same order of operations.

Pointer tables work under ``TRITON_INTERPRET=1`` for CPU tensors in triton 3.9 (the interpreter
dereferences raw host addresses), so the interpreter tests run the real kernel; no fallback path is
needed there. One interpreter difference is handled: it truncates float32 -> bfloat16 conversions
where the GPU rounds to nearest even, so under the interpreter the kernel rounds bf16 outputs by
hand (a constexpr switch), and kernel and reference then agree bitwise in every dtype.

Registration: like every op, through :func:`fedlora_kernels.ops._triton_utils.register` (a
``triton_op``), but opaque to ``torch.compile``: building a table of ``data_ptr()`` values cannot
be traced, so the reduction sits in compiled graphs as a single node with a shape-only fake
implementation. It has no autograd (aggregation needs none).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fedlora_kernels._dispatch import interpreting
from fedlora_kernels.ops._triton_utils import alloc_output, launch, register


@triton.jit
def _masked_mean_kernel(
    table_ptr,
    coef_ptr,
    has_ptr,
    fb_ptr,
    out_ptr,
    first_ptr,
    C,
    R,
    POST,
    numel,
    sfb_pre,
    sfb_rank,
    sfb_post,
    HAS_FB: tl.constexpr,
    RTNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per BLOCK output elements of ``[pre, R, post]``; clients summed in order.

    ``table`` holds one int64 row per client: ``(data_ptr, r_k, stride_pre, stride_rank,
    stride_post)``; ``coef`` ``[C, R]`` (convex per column) and ``has`` ``[R]`` (1.0 where some
    client contributes, else 0.0) are float32. ``first_ptr`` (client 0)
    only carries the clients' element type for the pointer casts.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    q = offs % POST
    t = offs // POST
    j = t % R
    p = t // R
    elt = first_ptr.dtype.element_ty
    num = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(C):
        row = table_ptr + k * 5
        base = tl.load(row).to(tl.pointer_type(elt))
        rk = tl.load(row + 1)
        s_pre = tl.load(row + 2)
        s_rank = tl.load(row + 3)
        s_post = tl.load(row + 4)
        c = tl.load(coef_ptr + k * R + j, mask=inb, other=0.0)
        take = inb & (j < rk) & (c != 0.0)
        x = tl.load(base + p * s_pre + j * s_rank + q * s_post, mask=take, other=0.0)
        num += tl.where(take, x.to(tl.float32) * c, 0.0)
    has = tl.load(has_ptr + j, mask=inb, other=0.0) > 0.0
    if HAS_FB:
        fb = tl.load(
            fb_ptr + p * sfb_pre + j * sfb_rank + q * sfb_post, mask=inb & (~has), other=0.0
        )
        res = tl.where(has, num, fb.to(tl.float32))
    else:
        res = tl.where(has, num, 0.0)
    if RTNE_BF16:
        # round to nearest even by hand: the interpreter truncates fp32 -> bf16 conversions
        bits = res.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        res = bits.to(tl.float32, bitcast=True)
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=inb)


def mean_config(numel: int) -> dict[str, int]:
    """Output elements per program (``BLOCK``) and ``num_warps`` for ``numel`` output elements
    (the kernel is memory-bound: one size serves every shape)."""
    return dict(BLOCK=1024, num_warps=4)


def _as_3d(x: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """``x`` viewed as ``[pre, r, post]`` (a view for every strided 2-D tensor and for contiguous
    ones; ``reshape`` copies only when the dimensions on one side of ``rank_dim`` cannot merge)."""
    pre = math.prod(x.shape[:rank_dim])
    post = math.prod(x.shape[rank_dim + 1 :])
    return x.reshape(pre, x.shape[rank_dim], post)


def masked_weighted_mean(
    tensors: list[torch.Tensor],
    coef: torch.Tensor,
    has: torch.Tensor,
    fallback: torch.Tensor | None,
    rank_dim: int,
    rank: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Shape bookkeeping around the op: every tensor goes in as ``[pre, r_k, post]``, the
    result comes back in the clients' shape with rank ``rank`` along ``rank_dim``."""
    shape = list(tensors[0].shape)
    shape[rank_dim] = rank
    views = [_as_3d(x, rank_dim) for x in tensors]
    fb = _as_3d(fallback, rank_dim) if fallback is not None else None
    return masked_weighted_mean_op(views, coef, has, fb, dtype).reshape(shape)


def _launch(
    tensors: list[torch.Tensor],
    coef: torch.Tensor,
    has: torch.Tensor,
    fallback: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Body of ``fedlora::masked_weighted_mean``: tensors ``[pre, r_k, post]`` -> ``[pre, R, post]``."""
    pre, _, post = tensors[0].shape
    rank = coef.shape[1]
    device = coef.device
    out = alloc_output((pre, rank, post), device=device, dtype=dtype)
    numel = out.numel()
    if numel == 0:
        return out
    rows = [[x.data_ptr(), x.shape[1], *x.stride()] for x in tensors]
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    fb_strides = fallback.stride() if fallback is not None else (0, 0, 0)
    cfg = mean_config(numel)
    launch(
        _masked_mean_kernel,
        (triton.cdiv(numel, cfg["BLOCK"]),),
        table, coef, has, fallback if fallback is not None else out, out, tensors[0],
        len(tensors), rank, post, numel, *fb_strides,
        HAS_FB=fallback is not None, RTNE_BF16=dtype == torch.bfloat16 and interpreting(), **cfg,
    )  # fmt: skip
    return out


def _launch_shape(
    tensors: list[torch.Tensor],
    coef: torch.Tensor,
    has: torch.Tensor,
    fallback: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    pre, _, post = tensors[0].shape
    return torch.empty((pre, coef.shape[1], post), device=coef.device, dtype=dtype)


masked_weighted_mean_op = register(
    "fedlora::masked_weighted_mean", _launch, opaque_shape=_launch_shape
)
