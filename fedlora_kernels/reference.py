"""Pure-PyTorch implementations of every op: the CPU path and the test oracle.

Each function here computes exactly what its fused Triton twin computes, with plain torch ops
(so ``torch.compile`` can trace it on any device). Inputs are assumed validated by the public op.
Low-precision inputs are computed in float32 and the result cast back, as the kernels do.
"""

from __future__ import annotations

import torch

from fedlora_kernels._dispatch import row_slots


def multihead_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    H: torch.Tensor,
    s: torch.Tensor,
    *,
    scale: float,
    seg_offsets: torch.Tensor,
    seg_adapter: torch.Tensor,
    head_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Multi-head LoRA adapter output, ``scale * Σ_i s[c,i] ((x A_iᵀ) H[c,i]ᵀ) B_iᵀ``.

    ``x`` ``[N, d_in]``; ``A`` ``[h, r, d_in]`` and ``B`` ``[h, d_out, r]`` are frozen (no
    gradient flows to them); ``H`` ``[C, h, r, r]`` and ``s`` ``[C, h]`` hold one core per adapter
    slot; row ``n`` uses the slot of its segment. ``head_mask`` ``[C, h]`` (0/1) zeroes the
    gradients of ``H`` and ``s`` for heads a slot does not train. Returns ``[N, d_out]`` in
    ``x.dtype``; computed in float32.
    """
    n, d_in = x.shape
    h, r, _ = A.shape
    num_slots = H.shape[0]
    if head_mask is not None:
        # identity in value, masks the gradient: a frozen head's core is seen through a detach
        keep = head_mask.to(H.dtype)
        H = H * keep[..., None, None] + (H * (1 - keep[..., None, None])).detach()
        s = s * keep.to(s.dtype) + (s * (1 - keep.to(s.dtype))).detach()
    xf = x.float()
    a_cat = A.detach().float().reshape(h * r, d_in)
    b_cat = B.detach().float().permute(1, 0, 2).reshape(B.shape[1], h * r)
    S = (xf @ a_cat.T).view(n, h, r)
    Hf, sf = H.float(), s.float()
    if num_slots == 1:
        T = torch.einsum("nhk,hjk->nhj", S, Hf[0]) * sf[0][None, :, None]
    else:
        slot = row_slots(seg_offsets, seg_adapter, n)
        T = torch.einsum("nhk,nhjk->nhj", S, Hf[slot]) * sf[slot][:, :, None]
    y = (T.reshape(n, h * r) @ b_cat.T) * scale
    return y.to(x.dtype)
