"""Masked weighted mean over clients: the server-side reduction behind every aggregation rule.

``out[j] = Σ_k w_k m_kj X_k[j] / Σ_k w_k m_kj`` along the rank dimension, ``fallback[j]`` (or 0)
where no client contributes. Client ``k`` of rank ``r_k`` has ``m_kj = 0`` for ``j ≥ r_k``: its
tensor is read as it is, never padded, stacked or copied.

The sum is evaluated as a convex combination ``Σ_k (c_kj / Σ_k' c_k'j) X_k[j]`` with
``c_kj = w_k m_kj``: the normalised coefficients are formed once, in float64, by
:func:`fedlora_kernels.reference.masked_mean_coefficients` (weights and mask are first divided
by their largest entry, so any finite positive weights work, 1e308 and 1e-300 alike). Every
partial sum then stays within the range of the inputs: finite inputs, even near the float32
maximum, give a finite result (an un-normalised ``Σ w_k X_k`` overflows there).

Triton kernel: one program per block of the flattened output ``[pre, R, post]``; it loops over the
clients in order, accumulating ``coef[k, j] · X_k`` in float32 per element (deterministic: every
element is summed in client order by one program, no atomics). The clients are reached through a
device table of ``(data_ptr, r_k, stride_pre, stride_rank, stride_post)`` rows, so each client is
read in place whatever its rank and strides. Kernel and torch reference use bitwise the same
coefficients and the same order of operations.

Pointer tables work under ``TRITON_INTERPRET=1`` for CPU tensors in triton 3.9 (the interpreter
dereferences raw host addresses), so the interpreter tests run the real kernel; no fallback path is
needed there. One interpreter difference is handled: it truncates float32 -> bfloat16 conversions
where the GPU rounds to nearest even, so under the interpreter the kernel rounds bf16 outputs by
hand (a constexpr switch), and kernel and reference then agree bitwise in every dtype.

Registration: the launcher is a ``torch.library.custom_op`` (with a fake implementation), not a
``triton_op``. A ``triton_op`` body is traced by ``torch.compile``, and building a table of
``data_ptr()`` values cannot be traced; as an opaque custom op the reduction still sits in compiled
graphs as a single node. It has no autograd (aggregation needs none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedlora_kernels import reference
from fedlora_kernels._dispatch import (
    FLOAT_DTYPES,
    check_tensor,
    interpreting,
    resolve_backend,
    values_unavailable,
)
from fedlora_kernels.ops._triton_utils import alloc_output

__all__ = ["masked_weighted_mean"]


def masked_weighted_mean(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float],
    mask: torch.Tensor | None = None,
    *,
    rank_dim: int = 0,
    fallback: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted mean of client tensors per rank index, over the clients whose mask holds it.

    Args:
        tensors: ``C`` client tensors of one shape except along ``rank_dim``, where client ``k``
            has its own rank ``r_k`` (a prefix of the full rank: ``m_kj = 0`` for ``j ≥ r_k``).
            One floating dtype for all, one device.
        weights: ``[C]`` non-negative finite client weights (tensor or sequence of numbers).
        mask: ``[C, R]`` per client and rank index, 0/1 (bool, int or float; any non-negative
            value acts as a multiplier of the weight). Omitted: all ones.
        rank_dim: the rank dimension of the tensors (``0`` for LoRA ``A`` ``[R, d_in]``, ``1``
            for ``B`` ``[d_out, R]``); negative values count from the end.
        fallback: tensor of the full output shape, used where ``Σ_k w_k m_kj = 0`` (e.g. the
            previous global state: "unchanged if no client contributed"). Omitted: 0 there.
        backend: ``"triton"`` or ``"torch"``; default by device (see ``FEDLORA_BACKEND``).

    The full rank ``R`` is ``fallback``'s size along ``rank_dim`` if given, else ``mask``'s
    second dimension if given, else ``max_k r_k``; every ``r_k`` must be ``≤ R``. With no clients
    (``C = 0``) the result is a copy of ``fallback``, which is then required.

    Returns:
        A new tensor of the full shape in ``fallback``'s dtype (else the clients' dtype),
        accumulated in float32 in client order (deterministic) as a convex combination, so it
        never overflows for finite inputs. Not differentiable. ``weights`` may be any
        non-negative finite numbers (they are normalised in float64); all zero (or masked out)
        for an index means "no contributor" there.
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a list of C client tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    num_clients = len(tensors)
    if fallback is not None:
        check_tensor("fallback", fallback, dtypes=FLOAT_DTYPES)
    if num_clients == 0 and fallback is None:
        raise ValueError("tensors is empty: give at least one client tensor or a fallback")
    ref = tensors[0] if num_clients else fallback
    for k, x in enumerate(tensors):
        check_tensor(f"tensors[{k}]", x, dtypes=FLOAT_DTYPES)
        if x.dtype != ref.dtype:
            raise TypeError(
                f"tensors[{k}] must have the dtype of tensors[0] ({ref.dtype}), got {x.dtype}"
            )
    ndim = ref.dim()
    if ndim < 1:
        raise ValueError(
            f"tensors must have at least 1 dimension (the rank), got shape {list(ref.shape)}"
        )
    if isinstance(rank_dim, bool) or not isinstance(rank_dim, int) or not -ndim <= rank_dim < ndim:
        raise ValueError(f"rank_dim must be an int in [{-ndim}, {ndim}), got {rank_dim!r}")
    rank_dim %= ndim
    other = [s for i, s in enumerate(ref.shape) if i != rank_dim]
    ranks = []
    for k, x in enumerate(tensors):
        if x.dim() != ndim or [s for i, s in enumerate(x.shape) if i != rank_dim] != other:
            raise ValueError(
                f"tensors[{k}] must match tensors[0] ({list(ref.shape)}) except along rank_dim="
                f"{rank_dim}, got shape {list(x.shape)}"
            )
        ranks.append(int(x.shape[rank_dim]))
    device = ref.device
    for k, x in enumerate(tensors):
        if x.device != device:
            raise ValueError(
                f"tensors[{k}] is on {x.device}, tensors[0] on {device}: use one device"
            )

    if fallback is not None:
        if (
            fallback.dim() != ndim
            or [s for i, s in enumerate(fallback.shape) if i != rank_dim] != other
        ):
            raise ValueError(
                f"fallback must have the clients' shape except along rank_dim={rank_dim} "
                f"(clients: {list(ref.shape)}), got shape {list(fallback.shape)}"
            )
        if fallback.device != device:
            raise ValueError(
                f"fallback is on {fallback.device}, the tensors on {device}: use one device"
            )
        full_rank = int(fallback.shape[rank_dim])
    elif mask is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        full_rank = int(mask.shape[1])
    else:
        full_rank = max(ranks)
    for k, r in enumerate(ranks):
        if r > full_rank:
            raise ValueError(
                f"tensors[{k}] has rank {r} along rank_dim={rank_dim}, more than the full rank "
                f"R={full_rank} (fallback's or mask's size)"
            )

    if not isinstance(weights, torch.Tensor):
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(
                f"weights must be a [C] tensor or a sequence of numbers, got "
                f"{type(weights).__name__}"
            )
        values = []
        for k, w in enumerate(weights):
            try:
                if isinstance(w, (bool, str, bytes)):
                    raise TypeError
                values.append(float(w))
            except (TypeError, ValueError):
                raise TypeError(
                    f"weights[{k}] must be a real number, got {type(w).__name__} {w!r}"
                ) from None
        # float64: weights such as 1e308 or 1e-300 must survive until they are normalised
        weights = torch.tensor(values, dtype=torch.float64)
    check_tensor("weights", weights, ndim=1, dtypes=None)
    if weights.is_complex() or weights.dtype == torch.bool:
        raise TypeError(f"weights must be real numbers, got dtype {weights.dtype}")
    if weights.shape[0] != num_clients:
        raise ValueError(f"weights must have shape [C={num_clients}], got {list(weights.shape)}")
    if weights.device.type == "meta" and device.type != "meta":
        raise ValueError(f"weights is on the meta device (no values), the tensors on {device}")
    # validated in their own precision, then carried in float64 (see masked_mean_coefficients)
    weights = weights.to(device=device)
    if mask is not None:
        check_tensor("mask", mask, ndim=2, dtypes=None)
        if mask.is_complex():
            raise TypeError(f"mask must be real (0/1), got dtype {mask.dtype}")
        if list(mask.shape) != [num_clients, full_rank]:
            raise ValueError(
                f"mask must have shape [C={num_clients}, R={full_rank}], got {list(mask.shape)}"
            )
        if mask.device.type == "meta" and device.type != "meta":
            raise ValueError(f"mask is on the meta device (no values), the tensors on {device}")
        mask = mask.to(device=device)
    if not values_unavailable(weights, mask):
        for name, t in (("weights", weights), ("mask", mask)):
            if t is not None and t.numel() and not bool(((t >= 0) & torch.isfinite(t)).all()):
                raise ValueError(f"{name} must be finite and non-negative, got {t.tolist()}")

    dtype = fallback.dtype if fallback is not None else ref.dtype
    if num_clients == 0 or resolve_backend(backend, device) == "torch":
        return reference.masked_weighted_mean(
            tensors,
            weights,
            mask,
            rank_dim=rank_dim,
            fallback=fallback,
            rank=full_rank,
            dtype=dtype,
        )
    coef, has = reference.masked_mean_coefficients(weights, mask, ranks, full_rank)
    # clients with nothing to read (rank 0, or an empty tensor) have no table row
    keep = [k for k, x in enumerate(tensors) if x.numel()]
    if len(keep) < num_clients:
        if not keep:
            return reference.masked_weighted_mean(
                tensors, weights, mask, rank_dim=rank_dim, fallback=fallback, rank=full_rank,
                dtype=dtype,
            )  # fmt: skip
        tensors, coef = [tensors[k] for k in keep], coef[keep]
    return _masked_mean_triton(
        tensors, coef.contiguous(), has.to(torch.float32), fallback, rank_dim, full_rank, dtype
    )


# ---------------------------------------------------------------------------------------------
# Triton implementation. triton is an optional dependency and ``TRITON_INTERPRET`` is read when a
# kernel is decorated, so the kernel below is a plain function until its first launch, where
# ``_ensure_registered`` imports triton, jit-compiles it and registers the custom op.
# ---------------------------------------------------------------------------------------------

_BLOCK = 1024
tl: Any = None  # triton.language, bound by _ensure_registered


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


def _as_3d(x: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """``x`` viewed as ``[pre, r, post]`` (a view for every strided 2-D tensor and for contiguous
    ones; ``reshape`` copies only when the dimensions on one side of ``rank_dim`` cannot merge)."""
    pre = math.prod(x.shape[:rank_dim])
    post = math.prod(x.shape[rank_dim + 1 :])
    return x.reshape(pre, x.shape[rank_dim], post)


def _masked_mean_triton(
    tensors: list[torch.Tensor],
    coef: torch.Tensor,
    has: torch.Tensor,
    fallback: torch.Tensor | None,
    rank_dim: int,
    rank: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Shape bookkeeping around the custom op: every tensor goes in as ``[pre, r_k, post]``."""
    shape = list(tensors[0].shape)
    shape[rank_dim] = rank
    views = [_as_3d(x, rank_dim) for x in tensors]
    fb = _as_3d(fallback, rank_dim) if fallback is not None else None
    _ensure_registered()
    out = torch.ops.fedlora.masked_weighted_mean(views, coef, has, fb, dtype)
    return out.reshape(shape)


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
    grid = (triton.cdiv(numel, _BLOCK),)
    _KERNEL[grid](
        table,
        coef,
        has,
        fallback if fallback is not None else out,
        out,
        tensors[0],
        len(tensors),
        rank,
        post,
        numel,
        *fb_strides,
        HAS_FB=fallback is not None,
        RTNE_BF16=dtype == torch.bfloat16 and interpreting(),
        BLOCK=_BLOCK,
        num_warps=4,
    )
    return out


def _launch_fake(
    tensors: list[torch.Tensor],
    coef: torch.Tensor,
    has: torch.Tensor,
    fallback: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    pre, _, post = tensors[0].shape
    return torch.empty((pre, coef.shape[1], post), device=coef.device, dtype=dtype)


triton: Any = None
_KERNEL: Any = None


def _ensure_registered() -> None:
    """Import triton, jit the kernel and register ``fedlora::masked_weighted_mean`` (once)."""
    global triton, tl, _KERNEL
    if _KERNEL is not None:
        return
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl
    kernel = triton.jit(_masked_mean_kernel)
    op = torch.library.custom_op(
        "fedlora::masked_weighted_mean",
        mutates_args=(),
        schema="(Tensor[] tensors, Tensor coef, Tensor has, Tensor? fallback, ScalarType dtype) -> Tensor",
    )(_launch)
    op.register_fake(_launch_fake)
    _KERNEL = kernel
