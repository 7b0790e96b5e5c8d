"""Multi-head LoRA (Ravan): ``y = scale · Σ_i s[c,i] · ((x A_iᵀ) H[c,i]ᵀ) B_iᵀ``.

The bases ``A`` ``[h, r, d_in]`` and ``B`` ``[h, d_out, r]`` are frozen and shared by every
adapter slot; each slot ``c`` has its own cores ``H[c]`` ``[h, r, r]`` and scalars ``s[c]``
``[h]``. Seen as ordinary LoRA of rank ``R = h·r`` with ``A_cat = [A_1; …; A_h]`` and
``B_cat = [B_1 … B_h]``, the core is block-diagonal, so the whole adapter is

    S = x A_catᵀ            [N, R]   (shrink: the only pass over x)
    T = s ⊙ (S H_bd[c]ᵀ)    [N, R]   (per-row slot core, applied on chip)
    y = scale · T B_catᵀ    [N, d_out]

Forward kernel: one program per tile of rows computes S over the whole of d_in, applies the core
of every segment that overlaps the tile, stores S (float32, kept for backward: x is never saved)
and streams the output tiles of d_out. Backward kernel: one program per row tile reads dy once to
form ``P = scale · dy B_cat``, writes per-(tile, segment) partials of ``dH`` and ``ds`` (summed
afterwards in a fixed order: deterministic, no atomics) and streams ``dx = dS A_cat``. A and B get
no gradient.
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

__all__ = ["multihead_lora"]


def multihead_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    H: torch.Tensor,
    s: torch.Tensor,
    *,
    scale: float = 1.0,
    seg_offsets: torch.Tensor | None = None,
    seg_adapter: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    base_out: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    segments: RowSegments | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Adapter output of a multi-head LoRA layer, or ``base_out`` plus it in one fused pass.

    Args:
        x: input ``[..., d_in]``.
        A: frozen down-projection bases ``[h, r, d_in]`` (same dtype as ``x``).
        B: frozen up-projection bases ``[h, d_out, r]`` (same dtype as ``x``).
        H: trainable cores ``[C, h, r, r]``, one set per adapter slot.
        s: trainable head scalars ``[C, h]``.
        scale: constant factor (``alpha / R``).
        seg_offsets: int ``[S+1]``; rows ``seg_offsets[t]:seg_offsets[t+1]`` of the flattened
            input form segment ``t``. Omitted: one segment.
        seg_adapter: int ``[S]``, the slot used by each segment. Omitted: segment ``t`` uses
            slot ``t`` (or slot 0 when ``C == 1``).
        head_mask: ``[C, h]`` of 0/1 (bool, int or float; any other value, NaN included, is a
            ``ValueError``, checked with a device sync unless the mask is ``bool``): heads with 0
            get exactly zero ``H``/``s`` gradient.
        base_out: optional ``[..., d_out]`` base-layer output; the result is then
            ``base_out + adapter`` in ``base_out``'s dtype, computed without an adapter-sized
            temporary on the Triton path (the gradient to ``base_out`` is the identity).
            ``base_out`` may have another dtype than ``x`` (a bf16 base output of an fp32 layer
            under ``torch.autocast``): the adapter is computed in the factors' dtype and added
            in float32.
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
        ``[..., d_out]`` in ``x.dtype`` (``base_out.dtype`` when given). Differentiable in
        ``x``, ``H``, ``s`` (and ``base_out``).
    """
    p = _prepare_multihead_lora(
        x, A, B, H, s, scale, seg_offsets, seg_adapter, head_mask, base_out, segments,
        base_weight, base_bias,
    )  # fmt: skip
    rows = p.rows
    segs = rows.segs
    d_out = B.shape[1]
    if resolve_backend(backend, p.device) == "torch":
        y = reference.multihead_lora(
            rows.x2,
            A,
            B,
            H,
            s,
            scale=p.scale,
            seg_offsets=segs.offsets,
            seg_adapter=segs.slots,
            head_mask=p.head_mask,
        )
        if base_out is not None:
            y = base_out.reshape(-1, d_out) + y.to(base_out.dtype)
        elif base_weight is not None:
            y = torch.nn.functional.linear(rows.x2, base_weight, base_bias) + y
    else:
        from fedlora_kernels.ops import _multihead_triton as impl

        base2 = base_out.reshape(-1, d_out) if base_out is not None else None
        if segs.single:  # the fast path: no table, nothing planned
            offsets = adapter = tiles = tiles_bwd = owner = None
        else:
            n, d_in = rows.x2.shape
            fwd, bwd = impl.tile_configs(n, d_in, d_out, A.shape[0] * A.shape[1])
            offsets, adapter = segs.offsets, segs.slots
            tiles, tiles_bwd = segs.tiles(fwd["BM"]), segs.tiles(bwd["BM"])
            owner = segs.owner(bwd["BM"], H.shape[0])
        y, _ = impl.multihead_lora_fwd(
            rows.x2, A.detach(), B.detach(), H, s, offsets, adapter, tiles, tiles_bwd, owner,
            segs.slot0, p.head_mask, p.scale, base2, base_weight, base_bias,
        )  # fmt: skip
    return y.reshape(*rows.lead, d_out)


class _MultiheadArgs(NamedTuple):
    rows: RowsInput
    head_mask: torch.Tensor | None  # float32 [C, h]
    scale: float
    device: torch.device


def _prepare_multihead_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    H: torch.Tensor,
    s: torch.Tensor,
    scale: float,
    seg_offsets: torch.Tensor | None,
    seg_adapter: torch.Tensor | None,
    head_mask: torch.Tensor | None,
    base_out: torch.Tensor | None,
    segments: RowSegments | None = None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
) -> _MultiheadArgs:
    """Validate the arguments of :func:`multihead_lora` (``ValueError``/``TypeError`` naming
    the argument) and normalise them."""
    check_rows_input(x)
    check_tensor("A", A, ndim=3)
    h, r, d_in = A.shape
    if h < 1 or r < 1 or d_in < 1:
        raise ValueError(f"A must have non-zero sizes [h, r, d_in], got shape {list(A.shape)}")
    check_tensor("B", B, ndim=3)
    check_tensor("H", H, ndim=4)
    check_tensor("s", s, ndim=2)
    if x.shape[-1] != d_in:
        raise ValueError(
            f"x must have last dimension d_in={d_in} (A is [h, r, d_in] = {list(A.shape)}), "
            f"got x of shape {list(x.shape)}"
        )
    check_shape("B", B, [h, None, r])
    d_out = B.shape[1]
    if d_out < 1:
        raise ValueError(f"B must have d_out >= 1 ([h, d_out, r]), got shape {list(B.shape)}")
    num_slots = H.shape[0]
    check_shape("H", H, [None, h, r, r])
    check_shape("s", s, [num_slots, h])
    if num_slots < 1:
        raise ValueError("H must have at least one adapter slot, got shape [0, ...]")
    check_factor_dtypes(x, A=A, B=B)
    if head_mask is not None:
        check_tensor("head_mask", head_mask, dtypes=MASK_DTYPES)
        check_shape("head_mask", head_mask, [num_slots, h])
        check_binary_mask("head_mask", head_mask)
    scale = check_finite_scalar("scale", scale)
    if base_out is not None:
        check_tensor("base_out", base_out, dtypes=FLOAT_DTYPES)
        check_shape("base_out", base_out, [*x.shape[:-1], d_out])
    device = check_same_device(
        x=x, A=A, B=B, H=H, s=s, head_mask=head_mask, base_out=base_out,
        base_weight=base_weight, base_bias=base_bias,
    )  # fmt: skip
    check_base_layer(x, d_in, d_out, base_out, base_weight, base_bias)
    rows = flatten_rows(x, d_in, seg_offsets, seg_adapter, num_slots, device, segments)
    if head_mask is not None:
        head_mask = head_mask.to(torch.float32)
    return _MultiheadArgs(rows, head_mask, scale, device)
