"""Triton kernel, launcher and registration of :func:`fedlora_kernels.masked_adamw_`.

One elementwise kernel does the whole fused AdamW step in place (registered through
:func:`fedlora_kernels.ops._triton_utils.register` as a ``triton_op`` that mutates its state
arguments). Inputs arrive validated from :mod:`fedlora_kernels.ops.masked_adamw`; see that module
for the update and the masking rules.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedlora_kernels.ops._triton_utils import launch, register


@triton.jit
def _masked_adamw_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    mask_ptr,
    ema_ptr,
    unc_ptr,
    ss_ptr,
    bc2_ptr,
    numel,
    MAT,
    KDIM,
    R,
    decay,
    w1,
    beta2,
    one_m_beta2,
    eps,
    step_size,
    bc2_sqrt,
    ib1,
    one_m_ib1,
    ib2,
    one_m_ib2,
    RANK_DIM: tl.constexpr,
    LERP_HI: tl.constexpr,
    PER_SLOT: tl.constexpr,
    HAS_IMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One AdamW step on a contiguous ``[C, M, K]`` parameter and its state, in place, for the
    elements whose rank component (row for ``RANK_DIM=0``, column for 1) has mask 1. Masked
    elements are neither loaded nor stored."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    slot = offs // MAT
    within = offs - slot * MAT
    if RANK_DIM == 0:
        comp = within // KDIM
    else:
        comp = within % KDIM
    keep = tl.load(mask_ptr + slot * R + comp, mask=inb, other=0)
    act = inb & (keep != 0)
    p = tl.load(p_ptr + offs, mask=act, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=act, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=act, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=act, other=0.0).to(tl.float32)
    if PER_SLOT:
        ss = tl.load(ss_ptr + slot, mask=act, other=0.0)
        bc2 = tl.load(bc2_ptr + slot, mask=act, other=1.0)
    else:
        ss = step_size
        bc2 = bc2_sqrt
    if HAS_IMP:
        # HAFL sensitivity at the weights the gradient was taken at (before this step)
        sens = tl.abs(p * g)
        e = tl.load(ema_ptr + offs, mask=act, other=0.0).to(tl.float32)
        u = tl.load(unc_ptr + offs, mask=act, other=0.0).to(tl.float32)
        e = e * ib1 + sens * one_m_ib1
        u = u * ib2 + tl.abs(sens - e) * one_m_ib2
        tl.store(ema_ptr + offs, e.to(ema_ptr.dtype.element_ty), mask=act)
        tl.store(unc_ptr + offs, u.to(unc_ptr.dtype.element_ty), mask=act)
    # torch.optim.AdamW, op for op: decay, lerp, addcmul, sqrt / bc2 + eps, addcdiv
    p = p * decay
    if LERP_HI:
        m = g - (g - m) * (1.0 - w1)
    else:
        m = m + w1 * (g - m)
    v = v * beta2 + one_m_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2) + eps
    p = p + (-ss) * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=act)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=act)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=act)


def adamw_config(numel: int) -> dict[str, int]:
    """Elements per program (``BLOCK``) and ``num_warps`` of the step kernel for ``numel``
    elements (the kernel is memory-bound: one size serves every shape)."""
    return dict(BLOCK=1024, num_warps=4)


def _step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor,
    ema: torch.Tensor | None,
    unc: torch.Tensor | None,
    step_size_t: torch.Tensor | None,
    bc2_sqrt_t: torch.Tensor | None,
    slots: int,
    rank_dim: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step_size: float,
    bc2_sqrt: float,
    imp_beta1: float,
    imp_beta2: float,
) -> None:
    """Launch the fused step. ``param`` and its state are contiguous, viewed as
    ``[slots, M, K]``; ``mask`` is ``[slots, R]`` int8. Per-slot bias terms come as float32
    tensors ``[slots]`` (``step_size_t``, ``bc2_sqrt_t``) or as the scalars."""
    numel = param.numel()
    if numel == 0:
        return
    mat = numel // slots
    kdim = param.shape[-1]
    rank = mask.shape[-1]
    per_slot = step_size_t is not None
    has_imp = ema is not None
    cfg = adamw_config(numel)
    w1 = 1.0 - beta1
    launch(
        _masked_adamw_kernel,
        (triton.cdiv(numel, cfg["BLOCK"]),),
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        mask,
        ema if has_imp else param,
        unc if has_imp else param,
        step_size_t if per_slot else mask,
        bc2_sqrt_t if per_slot else mask,
        numel,
        mat,
        kdim,
        rank,
        1.0 - lr * weight_decay,
        w1,
        beta2,
        1.0 - beta2,
        eps,
        step_size,
        bc2_sqrt,
        imp_beta1,
        1.0 - imp_beta1,
        imp_beta2,
        1.0 - imp_beta2,
        RANK_DIM=rank_dim,
        LERP_HI=w1 >= 0.5,
        PER_SLOT=per_slot,
        HAS_IMP=has_imp,
        **cfg,
    )


masked_adamw_op = register(
    "fedlora::masked_adamw_", _step, mutates_args={"param", "exp_avg", "exp_avg_sq", "ema", "unc"}
)
