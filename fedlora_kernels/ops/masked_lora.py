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

from typing import NamedTuple

import torch

from fedlora_kernels import reference
from fedlora_kernels._dispatch import (
    FLOAT_DTYPES,
    MASK_DTYPES,
    RowsInput,
    check_base_layer,
    check_binary_mask,
    check_factor_dtypes,
    check_finite_scalar,
    check_rows_input,
    check_same_device,
    check_shape,
    check_tensor,
    flatten_rows,
    resolve_backend,
)
from fedlora_kernels.segments import RowSegments

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
    base_out: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    segments: RowSegments | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Adapter output of a (masked, multi-slot) LoRA layer, or ``base_out`` plus it in one pass.

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
        base_out: optional ``[..., d_out]`` base-layer output; the result is then
            ``base_out + adapter`` in ``base_out``'s dtype, accumulated in the expand's pass on
            the Triton path (no adapter-sized temporary, no separate add; the gradient to
            ``base_out`` is the identity). It may have another dtype than ``x`` (a bf16 base
            output of an fp32 layer under ``torch.autocast``).
        base_weight: optional frozen base-layer weight ``[d_out, d_in]`` (``x``'s dtype; with
            ``base_bias`` ``[d_out]``): the op then computes the whole layer, ``x Wᵀ + b +
            adapter``, owning the base GEMM (cuBLAS) so that the adapter is accumulated into
            its output in place and, in backward, the adapter's input gradient into ``dy W`` in
            the kernel's own pass (no separate add of two ``[N, d_in]`` gradients). The weight
            gets no gradient. Not together with ``base_out``.
        segments: the batch's :class:`fedlora_kernels.RowSegments` (validated and planned once
            for every layer: no host sync, no planning per call), instead of ``seg_offsets`` /
            ``seg_adapter``.
        backend: ``"triton"`` or ``"torch"``; default by device (see ``FEDLORA_BACKEND``).

    Returns:
        ``[..., d_out]`` in ``x.dtype`` (``base_out.dtype`` when given), differentiable in
        ``x``, ``A`` and ``B`` (and ``base_out``). Masks accept
        bool, integer or float dtypes; any value other than 0 and 1 is a ``ValueError`` (checked
        with a device sync unless the mask is ``bool``).
    """
    p = _prepare_masked_lora(
        x, A, B, scale, rank_mask, grad_mask, seg_offsets, seg_adapter, base_out, segments,
        base_weight, base_bias,
    )  # fmt: skip
    rows = p.rows
    segs = rows.segs
    d_out = p.B3.shape[1]
    if resolve_backend(backend, p.device) == "torch":
        y = reference.masked_lora(
            rows.x2,
            p.A3,
            p.B3,
            scale=p.scale,
            rank_mask=p.rank_mask,
            grad_mask=p.grad_mask,
            seg_offsets=segs.offsets,
            seg_adapter=segs.slots,
        )
        if base_out is not None:
            y = base_out.reshape(-1, d_out) + y.to(base_out.dtype)
        elif base_weight is not None:
            y = torch.nn.functional.linear(rows.x2, base_weight, base_bias) + y
    else:
        from fedlora_kernels.ops import _masked_lora_triton as impl

        base2 = base_out.reshape(-1, d_out) if base_out is not None else None
        if segs.single and (p.rank_mask is None or segs.num_segs == 1):
            offsets = adapter = tiles = tiles_red = owner = None  # the fast path
        else:
            n, d_in = rows.x2.shape
            rows_cfg, red_cfg = impl.tile_configs(n, d_in, d_out, p.A3.shape[1])
            offsets, adapter = segs.offsets, segs.slots
            tiles, tiles_red = segs.tiles(rows_cfg["BM"]), segs.tiles(red_cfg["CH"])
            owner = segs.owner(red_cfg["CH"], p.A3.shape[0])
        y, _ = impl.masked_lora_fwd(
            rows.x2, p.A3, p.B3, p.rank_mask, p.grad_mask, offsets, adapter, tiles, tiles_red,
            owner, segs.slot0, p.scale, base2, base_weight, base_bias,
        )  # fmt: skip
    return y.reshape(*rows.lead, d_out)


class _MaskedLoRAArgs(NamedTuple):
    rows: RowsInput
    A3: torch.Tensor  # [C, R, d_in]
    B3: torch.Tensor  # [C, d_out, R]
    rank_mask: torch.Tensor | None  # float32 [S, R], contiguous
    grad_mask: torch.Tensor | None  # float32 [C, R], contiguous
    scale: float
    device: torch.device


def _prepare_masked_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    rank_mask: torch.Tensor | None,
    grad_mask: torch.Tensor | None,
    seg_offsets: torch.Tensor | None,
    seg_adapter: torch.Tensor | None,
    base_out: torch.Tensor | None = None,
    segments: RowSegments | None = None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
) -> _MaskedLoRAArgs:
    """Validate the arguments of :func:`masked_lora` (``ValueError``/``TypeError`` naming the
    argument) and normalise them: factors 3-D, masks float32 with one row per segment / slot."""
    check_rows_input(x)
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
    if B3.shape[1] < 1:
        raise ValueError(f"B must have d_out >= 1, got shape {list(B.shape)}")
    check_factor_dtypes(x, A=A, B=B)
    scale = check_finite_scalar("scale", scale)
    for name, m in (("rank_mask", rank_mask), ("grad_mask", grad_mask)):
        if m is not None:
            check_tensor(name, m, ndim=(1, 2), dtypes=MASK_DTYPES)
    if base_out is not None:
        check_tensor("base_out", base_out, dtypes=FLOAT_DTYPES)
        check_shape("base_out", base_out, [*x.shape[:-1], B3.shape[1]])
    device = check_same_device(
        x=x, A=A, B=B, rank_mask=rank_mask, grad_mask=grad_mask, base_out=base_out,
        base_weight=base_weight, base_bias=base_bias,
    )  # fmt: skip
    check_base_layer(x, d_in, B3.shape[1], base_out, base_weight, base_bias)
    rows = flatten_rows(x, d_in, seg_offsets, seg_adapter, num_slots, device, segments)
    if rank_mask is not None:
        rank_mask = _rank_mask_per_segment(rank_mask, rows.segs.num_segs, rank)
    if grad_mask is not None:
        grad_mask = _grad_mask_per_slot(grad_mask, num_slots, rank, batched)
    return _MaskedLoRAArgs(rows, A3, B3, rank_mask, grad_mask, scale, device)


def _rank_mask_per_segment(rank_mask: torch.Tensor, num_segs: int, rank: int) -> torch.Tensor:
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
    return rank_mask.to(torch.float32).contiguous()


def _grad_mask_per_slot(
    grad_mask: torch.Tensor, num_slots: int, rank: int, batched: bool
) -> torch.Tensor:
    if grad_mask.dim() == 1 and not batched:
        check_shape("grad_mask", grad_mask, [rank])
        grad_mask = grad_mask.unsqueeze(0)
    elif tuple(grad_mask.shape) != (num_slots, rank):
        raise ValueError(
            f"grad_mask must have shape [C={num_slots}, R={rank}] (one row per adapter slot), "
            f"got {list(grad_mask.shape)}"
        )
    check_binary_mask("grad_mask", grad_mask)
    return grad_mask.to(torch.float32).contiguous()
