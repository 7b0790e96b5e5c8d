"""Masked LoRA: ``y = scale · ((x A_cᵀ) ⊙ m_t) B_cᵀ`` with per-segment rank masks and per-slot
gradient masks.

The adapter of slot ``c`` is plain LoRA in PEFT's layout (``A[c]`` ``[R, d_in]``, ``B[c]``
``[d_out, R]``); two masks act on its rank components:

* ``rank_mask`` ``[S, R]`` (forward): segment ``t`` sees only the components whose entry is 1. A
  prefix mask truncates the adapter to rank ``r`` (PreLort's nested ranks, HetLoRA's client
  ranks); several segments with the same slot and different masks train one adapter under
  several truncations in one pass, their gradients adding up in that slot.
* ``grad_mask`` ``[C, R]`` (backward): only the components whose entry is 1 train (HAFL's
  freezing). The frozen components still take part in the forward and in ``dx``, but their rows
  of ``A[c]`` and columns of ``B[c]`` get exactly zero gradient, and the Triton backward skips
  their work entirely.

The Triton path (CUDA, or the interpreter) runs

    T = (x A_cᵀ) ⊙ m_t      [N, R]   (shrink + mask: the only pass over x in forward; T is saved)
    y = scale · T B_cᵀ      [N, d_out]
    dS = scale · (dy B_c) ⊙ m_t,  dx = dS A_c                 (one row-tile kernel)
    dB_c = scale · Σ_rows dyᵀ T,  dA_c = Σ_rows dSᵀ x          (per trainable component only)

with deterministic per-(chunk, segment) partial sums (see
:mod:`fedlora_kernels.ops._masked_lora_triton`). Unlike multi-head LoRA, ``dA`` needs ``x``, so
``x`` is saved for backward. The CPU path is :func:`fedlora_kernels.reference.masked_lora`.
"""

from __future__ import annotations

import torch

from fedlora_kernels import reference
from fedlora_kernels._dispatch import (
    FLOAT_DTYPES,
    MASK_DTYPES,
    check_binary_mask,
    check_finite_scalar,
    check_same_device,
    check_segments,
    check_shape,
    check_tensor,
    resolve_backend,
)

# check_binary_mask and MASK_DTYPES live in fedlora_kernels._dispatch (shared by every op);
# they stay importable from here for existing callers
__all__ = ["MASK_DTYPES", "check_binary_mask", "masked_lora"]


def masked_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scale: float = 1.0,
    rank_mask: torch.Tensor | None = None,
    grad_mask: torch.Tensor | None = None,
    seg_offsets: torch.Tensor | None = None,
    seg_adapter: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Adapter output of a (masked, multi-slot) LoRA layer: add it to the base layer's output.

    Args:
        x: input ``[..., d_in]``.
        A: down-projections ``[C, R, d_in]``, or ``[R, d_in]`` for one slot (same dtype as x).
        B: up-projections ``[C, d_out, R]``, or ``[d_out, R]`` (same dtype and rank as ``A``).
        scale: constant factor (``alpha / R_global``; DESIGN §2).
        rank_mask: ``[S, R]`` of 0/1, one row per segment: the components segment ``t`` uses in
            the forward. ``[R]`` applies one mask to every segment. Omitted: all components.
        grad_mask: ``[C, R]`` of 0/1, one row per slot: the components that get a gradient.
            ``[R]`` is accepted when ``A`` is 2-D. Omitted: all components train.
        seg_offsets: int ``[S+1]``; rows ``seg_offsets[t]:seg_offsets[t+1]`` of the flattened
            input form segment ``t``. Omitted: one segment.
        seg_adapter: int ``[S]``, the slot of each segment; several segments may share one.
            Omitted: segment ``t`` uses slot ``t`` (or slot 0 when ``C == 1``).
        backend: ``"triton"`` or ``"torch"``; default by device (see ``FEDLORA_BACKEND``).

    Returns:
        ``[..., d_out]`` in ``x.dtype``, differentiable in ``x``, ``A`` and ``B``. Masks accept
        bool, integer or float dtypes; any value other than 0 and 1 is a ``ValueError`` (checked
        with a device sync unless the mask is ``bool``).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension [..., d_in], got shape {list(x.shape)}")
    check_tensor("A", A, ndim=(2, 3))
    check_tensor("B", B, ndim=(2, 3))
    if B.dim() != A.dim():
        raise ValueError(
            f"A and B must both be 2-D (one slot) or both 3-D ([C, ...]); got A of shape "
            f"{list(A.shape)} and B of shape {list(B.shape)}"
        )
    batched = A.dim() == 3
    A3 = A if batched else A.unsqueeze(0)
    B3 = B if batched else B.unsqueeze(0)
    num_slots, rank, d_in = A3.shape
    if num_slots < 1 or rank < 1 or d_in < 1:
        raise ValueError(f"A must have non-zero sizes [C, R, d_in], got shape {list(A.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(
            f"x must have last dimension d_in={d_in} (A is {list(A.shape)}), "
            f"got x of shape {list(x.shape)}"
        )
    check_shape("B", B, [num_slots, None, rank] if batched else [None, rank])
    d_out = B3.shape[1]
    if d_out < 1:
        raise ValueError(f"B must have d_out >= 1, got shape {list(B.shape)}")
    for name, t in (("A", A), ("B", B)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    scale = check_finite_scalar("scale", scale)
    for name, m in (("rank_mask", rank_mask), ("grad_mask", grad_mask)):
        if m is not None:
            check_tensor(name, m, ndim=(1, 2), dtypes=MASK_DTYPES)
    device = check_same_device(x=x, A=A, B=B, rank_mask=rank_mask, grad_mask=grad_mask)

    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    n = x2.shape[0]
    offsets, adapter = check_segments(seg_offsets, seg_adapter, n, num_slots, device)
    num_segs = adapter.numel()

    if rank_mask is not None:
        if rank_mask.dim() == 1:
            check_shape("rank_mask", rank_mask, [rank])
            rank_mask = rank_mask.expand(num_segs, rank)
        else:
            if rank_mask.shape[1] != rank:
                raise ValueError(
                    f"rank_mask must have shape [S={num_segs}, R={rank}] (R from A), "
                    f"got {list(rank_mask.shape)}"
                )
            if rank_mask.shape[0] != num_segs:
                raise ValueError(
                    f"rank_mask must have one row per segment: shape [S={num_segs}, R={rank}], "
                    f"got {list(rank_mask.shape)}"
                )
        check_binary_mask("rank_mask", rank_mask)
        rank_mask = rank_mask.to(torch.float32).contiguous()
    if grad_mask is not None:
        if grad_mask.dim() == 1 and not batched:
            check_shape("grad_mask", grad_mask, [rank])
            grad_mask = grad_mask.unsqueeze(0)
        elif tuple(grad_mask.shape) != (num_slots, rank):
            raise ValueError(
                f"grad_mask must have shape [C={num_slots}, R={rank}] (one row per adapter slot), "
                f"got {list(grad_mask.shape)}"
            )
        check_binary_mask("grad_mask", grad_mask)
        grad_mask = grad_mask.to(torch.float32).contiguous()

    if resolve_backend(backend, device) == "torch":
        y = reference.masked_lora(
            x2,
            A3,
            B3,
            scale=scale,
            rank_mask=rank_mask,
            grad_mask=grad_mask,
            seg_offsets=offsets,
            seg_adapter=adapter,
        )
    else:
        from fedlora_kernels.ops import _masked_lora_triton as impl

        y, _ = impl.masked_lora_fwd(x2, A3, B3, rank_mask, grad_mask, offsets, adapter, scale)
    return y.reshape(*lead, d_out)
