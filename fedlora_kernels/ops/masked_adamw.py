"""Masked AdamW: one fused, in-place AdamW step on the rank components whose mask is 1.

Used by HAFL's freezing mode (a client trains only its top-``m_k`` components) and by the batched
simulator (per-client optimizer state stacked ``[C, ...]``; a client that has finished its local
steps is masked out, a client that started later has its own step count). The update is
``torch.optim.AdamW``'s, op for op (decoupled weight decay, bias correction); the components whose
mask is 0 keep the parameter AND both moment buffers bitwise unchanged: they are neither
read nor written by the Triton kernel.

Optionally the same pass updates HAFL's importance statistics (DESIGN §4) from the weight BEFORE
the step (``I = |w · ∂L/∂w|`` at the weights the gradient was taken at):
``Ī ← β1 Ī + (1−β1) I`` and then ``Ū ← β2 Ū + (1−β2) |I − Ī|`` with the updated ``Ī``
(AdaLoRA's order). Like the optimizer state, the statistics of masked components are left
unchanged: a frozen component has no gradient, so it has no new sensitivity either.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fedlora_kernels import reference
from fedlora_kernels._dispatch import (
    FLOAT_DTYPES,
    MASK_DTYPES,
    check_binary_mask,
    check_finite_scalar,
    check_same_device,
    check_tensor,
    resolve_backend,
    values_unavailable,
)

__all__ = ["masked_adamw_"]


def _check_beta(name: str, value: object) -> float:
    value = check_finite_scalar(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return value


def _check_state(name: str, t: object, shape: torch.Size) -> torch.Tensor:
    """A tensor updated in place: float, the parameter's shape, contiguous."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES)
    if t.shape != shape:
        raise ValueError(f"{name} must have the shape of param {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")
    return t


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[start, end)`` that ``t``'s elements occupy in memory."""
    if t.numel() == 0:
        return (0, 0)
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True) if n > 1)
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()


def _check_no_overlap(**tensors: torch.Tensor | None) -> None:
    """``ValueError`` when a tensor updated in place shares memory with another argument.

    The in-place tensors (all but the last, ``grad``) must not overlap each other or ``grad``:
    an update would read values it has just written. Address arithmetic only (no sync);
    skipped when the addresses mean nothing (meta / fake tensors, ``torch.compile`` tracing).
    """
    given = {n: t for n, t in tensors.items() if t is not None and t.numel()}
    if values_unavailable(*given.values()):
        return
    names = list(given)
    spans = {n: _span(t) for n, t in given.items()}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (s1, e1), (s2, e2) = spans[a], spans[b]
            if s1 < e2 and s2 < e1:
                raise ValueError(
                    f"{a} and {b} share memory; the tensors updated in place (param, exp_avg, "
                    "exp_avg_sq, importance ema/unc) must be distinct from each other and from "
                    "grad"
                )


def masked_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor,
    *,
    lr: float,
    betas: Sequence[float],
    eps: float,
    weight_decay: float,
    step: int | torch.Tensor,
    rank_dim: int = 0,
    importance: tuple[torch.Tensor, torch.Tensor, float, float] | None = None,
    backend: str | None = None,
) -> None:
    """One AdamW step, in place, on the rank components of ``param`` whose mask is 1.

    Args:
        param: a LoRA factor, updated in place: ``[R, d_in]`` (A, ``rank_dim=0``) or
            ``[d_out, R]`` (B, ``rank_dim=1``); batched over adapter slots ``[C, R, d_in]`` /
            ``[C, d_out, R]``. Contiguous.
        grad: its gradient, same shape (any float dtype, any strides).
        exp_avg, exp_avg_sq: AdamW's moment buffers, same shape, contiguous, updated in place.
        mask: 0/1 per rank component: ``[R]`` for a 2-D ``param``, ``[C, R]`` for a 3-D one.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        step: the step number this update is (1 for the first), as ``torch.optim.AdamW``'s state
            holds it after incrementing; or a tensor ``[C]`` (or 0-d) of per-slot step numbers,
            for stacked clients that have taken different numbers of steps (on any device).
        rank_dim: which dimension of the (per-slot) matrix indexes rank components: 0 for the
            rows of A, 1 for the columns of B (negative values count from the end). The same
            value serves 2-D and batched parameters.
        importance: ``(ema, unc, beta1, beta2)``: HAFL's smoothed sensitivity and uncertainty
            (tensors like ``param``, contiguous), updated in the same pass from ``|param · grad|``
            taken before the step (see the module docstring).
        backend: ``"triton"``, ``"torch"`` or ``"c"``; default by device (see
            ``FEDLORA_BACKEND``): CUDA tensors run the Triton kernel, CPU tensors the C library
            (libfedlora, ``csrc/``: float32 state, float32/bfloat16 gradient; only the trained
            components are visited) when it is built, else the torch reference. The C path
            follows the reference op for op except ``sqrt``, which it rounds correctly (torch's
            vectorised float32 sqrt may be 1 ulp off), so the parameter can differ from the
            reference's in the last bit; the moments and importance statistics are bitwise equal.

    The masked components of ``param``, ``exp_avg``, ``exp_avg_sq`` (and ``ema``, ``unc``) stay
    bitwise unchanged. Returns ``None``.
    """
    p = _prepare_masked_adamw(
        param, grad, exp_avg, exp_avg_sq, mask, lr, betas, eps, weight_decay, step, rank_dim,
        importance,
    )  # fmt: skip
    chosen = resolve_backend(backend, p.device, c_op="masked_adamw_")
    if chosen == "c" and _c_supported(param, grad, exp_avg, exp_avg_sq, p):
        _masked_adamw_c(param, grad, exp_avg, exp_avg_sq, p)
        return None
    if chosen != "triton":
        view = (p.slots, *param.shape[-2:])
        reference.masked_adamw_(
            param.view(view),
            grad.reshape(view),
            exp_avg.view(view),
            exp_avg_sq.view(view),
            p.mask,
            lr=p.lr,
            beta1=p.beta1,
            beta2=p.beta2,
            eps=p.eps,
            weight_decay=p.weight_decay,
            step=p.step,
            rank_dim=p.rank_dim,
            importance=None
            if p.ema is None
            else (p.ema.view(view), p.unc.view(view), p.imp_beta1, p.imp_beta2),
        )
        return None

    from fedlora_kernels.ops import _masked_adamw_triton as impl

    step_size_t = bc2_sqrt_t = None
    step_size = bc2_sqrt = 1.0
    if isinstance(p.step, torch.Tensor):
        step_size_t, bc2_sqrt_t = reference.adamw_bias_terms(p.step, p.lr, p.beta1, p.beta2)
        step_size_t, bc2_sqrt_t = step_size_t.contiguous(), bc2_sqrt_t.contiguous()
    else:
        step_size, bc2_sqrt = reference.adamw_bias_terms(p.step, p.lr, p.beta1, p.beta2)
    impl.masked_adamw_op(
        param, grad.contiguous(), exp_avg, exp_avg_sq, (p.mask != 0).to(torch.int8).contiguous(),
        p.ema, p.unc, step_size_t, bc2_sqrt_t, p.slots, p.rank_dim, p.lr, p.beta1, p.beta2,
        p.eps, p.weight_decay, step_size, bc2_sqrt, p.imp_beta1, p.imp_beta2,
    )  # fmt: skip
    return None


def _c_supported(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    p: _AdamWArgs,
) -> bool:
    """The C path: float32 state (param, moments, importance), float32/bfloat16 gradient,
    values readable (not while tracing)."""
    from fedlora_kernels import _clib

    state = [param, exp_avg, exp_avg_sq, p.ema, p.unc]
    return (
        all(t is None or t.dtype == torch.float32 for t in state)
        and grad.dtype in _clib.DTYPES
        and param.numel() > 0
        and not values_unavailable(param, grad, p.mask, *(t for t in state if t is not None))
        and (not isinstance(p.step, torch.Tensor) or not values_unavailable(p.step))
    )


def _masked_adamw_c(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    p: _AdamWArgs,
) -> None:
    """The CPU path through libfedlora (``fedlora_masked_adamw``), in place."""
    from fedlora_kernels import _clib

    view = (p.slots, *param.shape[-2:])
    tensor_step = isinstance(p.step, torch.Tensor)
    steps = p.step.tolist() if tensor_step else [p.step] * p.slots
    importance = None
    if p.ema is not None:
        importance = (p.ema.view(view), p.unc.view(view), p.imp_beta1, p.imp_beta2)
    _clib.masked_adamw(
        param.view(view), grad.detach().reshape(view).contiguous(), exp_avg.view(view),
        exp_avg_sq.view(view), p.mask, steps, lr=p.lr, beta1=p.beta1, beta2=p.beta2, eps=p.eps,
        weight_decay=p.weight_decay, rank_dim=p.rank_dim, tensor_step=tensor_step,
        importance=importance,
    )  # fmt: skip
    # written behind autograd's back: bump the version counters as an in-place torch op would
    written = [param, exp_avg, exp_avg_sq] + ([p.ema, p.unc] if p.ema is not None else [])
    torch.autograd.graph.increment_version(written)


class _AdamWArgs(NamedTuple):
    """Validated arguments of :func:`masked_adamw_`."""

    slots: int
    rank_dim: int  # 0 or 1
    mask: torch.Tensor  # [slots, R]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int | torch.Tensor  # an int, or [slots] on the parameter's device
    ema: torch.Tensor | None
    unc: torch.Tensor | None
    imp_beta1: float
    imp_beta2: float
    device: torch.device


def _prepare_masked_adamw(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor,
    lr: float,
    betas: Sequence[float],
    eps: float,
    weight_decay: float,
    step: int | torch.Tensor,
    rank_dim: int,
    importance: tuple[torch.Tensor, torch.Tensor, float, float] | None,
) -> _AdamWArgs:
    """Validate the arguments of :func:`masked_adamw_` (``ValueError``/``TypeError`` naming the
    argument) and normalise them."""
    check_tensor("param", param, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    if not param.is_contiguous():
        raise ValueError("param must be contiguous (it is updated in place)")
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES)
    if grad.shape != param.shape:
        raise ValueError(
            f"grad must have the shape of param {list(param.shape)}, got {list(grad.shape)}"
        )
    _check_state("exp_avg", exp_avg, param.shape)
    _check_state("exp_avg_sq", exp_avg_sq, param.shape)
    if (
        isinstance(rank_dim, bool)
        or not isinstance(rank_dim, int)
        or rank_dim not in (0, 1, -1, -2)
    ):
        raise ValueError(
            f"rank_dim must be 0 (rows: A [R, d_in]) or 1 (columns: B [d_out, R]), got {rank_dim!r}"
        )
    rank_dim = rank_dim % 2
    batched = param.dim() == 3
    slots = param.shape[0] if batched else 1
    rank = param.shape[-2 + rank_dim]
    _check_mask(mask, batched, slots, rank, rank_dim)
    lr, beta1, beta2, eps, weight_decay = _check_hyperparameters(lr, betas, eps, weight_decay)
    step = _check_step(step, batched, slots)
    ema = unc = None
    imp_b1 = imp_b2 = 0.0
    if importance is not None:
        if not isinstance(importance, (tuple, list)) or len(importance) != 4:
            raise ValueError("importance must be a tuple (ema, unc, beta1, beta2)")
        ema = _check_state("importance[0] (ema)", importance[0], param.shape)
        unc = _check_state("importance[1] (unc)", importance[1], param.shape)
        imp_b1 = _check_beta("importance[2] (beta1)", importance[2])
        imp_b2 = _check_beta("importance[3] (beta2)", importance[3])
    device = check_same_device(
        param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, mask=mask, ema=ema, unc=unc
    )
    _check_no_overlap(
        param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, ema=ema, unc=unc, grad=grad
    )
    if isinstance(step, torch.Tensor):  # may live on the CPU, as torch.optim keeps its steps
        step = step.to(device)
    return _AdamWArgs(
        slots, rank_dim, mask.reshape(slots, rank), lr, beta1, beta2, eps, weight_decay, step,
        ema, unc, imp_b1, imp_b2, device,
    )  # fmt: skip


def _check_mask(mask: object, batched: bool, slots: int, rank: int, rank_dim: int) -> None:
    check_tensor("mask", mask, ndim=(1, 2), dtypes=MASK_DTYPES)
    want = (slots, rank) if batched else (rank,)
    if tuple(mask.shape) != want and not (not batched and tuple(mask.shape) == (1, rank)):
        what = f"[C={slots}, R={rank}]" if batched else f"[R={rank}]"
        raise ValueError(
            f"mask must have shape {what} (R = size of param dimension {rank_dim} of each "
            f"matrix, rank_dim={rank_dim}), got {list(mask.shape)}"
        )
    check_binary_mask("mask", mask)


def _check_hyperparameters(
    lr: object, betas: object, eps: object, weight_decay: object
) -> tuple[float, float, float, float, float]:
    """``(lr, beta1, beta2, eps, weight_decay)`` as floats, each finite and in range."""
    lr = check_finite_scalar("lr", lr)
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1 = _check_beta("betas[0]", betas[0])
    beta2 = _check_beta("betas[1]", betas[1])
    eps = check_finite_scalar("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    weight_decay = check_finite_scalar("weight_decay", weight_decay)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return lr, beta1, beta2, eps, weight_decay


def _check_step(step: object, batched: bool, slots: int) -> int | torch.Tensor:
    """The step number(s): an int >= 1, or a real tensor ``[slots]`` of whole numbers >= 1."""
    if isinstance(step, torch.Tensor):
        if step.is_complex() or step.dtype == torch.bool:
            raise TypeError(f"step must be an int or a real tensor, got dtype {step.dtype}")
        if step.dim() == 0 or (step.dim() == 1 and step.numel() == 1 and not batched):
            step = step.reshape(1).expand(slots)
        elif tuple(step.shape) != (slots,):
            raise ValueError(
                f"step must be an int or a tensor [C={slots}] (one step number per slot), "
                f"got shape {list(step.shape)}"
            )
        if not values_unavailable(step):
            bad = ~(step >= 1)  # NaN too
            if step.is_floating_point():
                bad |= step != torch.floor(step)
            if bool(bad.any()):
                raise ValueError(
                    f"step must be >= 1 (the first step is 1) and whole, got {step.tolist()}"
                )
        return step
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int or a tensor, got {type(step).__name__}")
    step = int(step)
    if step < 1:
        raise ValueError(f"step must be >= 1 (the first step is 1), got {step}")
    return step
