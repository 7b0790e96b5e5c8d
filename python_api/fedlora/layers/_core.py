"""The functional core of the adapters: pure functions on tensors, no modules, no state.

Both layer families call it: fedlora's own layers (:class:`fedlora.layers.LoRALinear`,
:class:`fedlora.layers.RavanLinear`, which stack ``num_clients`` slots) and PEFT's custom
modules (:mod:`fedlora.peft`, one adapter per name), so that an adapter is created, run, merged
and restricted to some heads by one piece of code whichever wrapper holds its tensors:

- creation from a seed (the per-path seed is :func:`fedlora.injection.layer_seed`):
  :func:`lora_init_A` / :func:`lora_factors`, :func:`ravan_bases` / :func:`ravan_cores`;
- the forward given the tensors and masks: :func:`lora_forward`, :func:`ravan_forward`;
- the dense update: :func:`lora_delta_weight`, :func:`ravan_delta_weight`;
- selection validation: :func:`check_init`, :func:`head_selection`, :func:`mask_indices`.

Layouts are DESIGN §2's: LoRA ``A`` ``[..., R, d_in]``, ``B`` ``[..., d_out, R]``; Ravan ``A``
``[h, r, d_in]``, ``B`` ``[h, d_out, r]``, ``H`` ``[C, h, r, r]``, ``s`` ``[C, h]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import fedlora_kernels as fk
from fedlora import keys
from fedlora.layers._base import check_int, check_positive_int, selection_mask

__all__ = [
    "A_NAME",
    "B_NAME",
    "H_NAME",
    "LORA_INITS",
    "RAVAN_INITS",
    "S_NAME",
    "check_init",
    "head_selection",
    "lora_delta_weight",
    "lora_factors",
    "lora_forward",
    "lora_init_A",
    "mask_indices",
    "ravan_bases",
    "ravan_cores",
    "ravan_delta_weight",
    "ravan_forward",
]

#: Names of a layer's own adapter tensors (state-dict keys without the module path).
A_NAME, B_NAME, H_NAME, S_NAME = (s.removeprefix(".") for s in keys.ADAPTER_SUFFIXES)
LORA_INITS = ("kaiming", "gaussian")
RAVAN_INITS = ("orthogonal", "gaussian")


# ------------------------------------------------------------------------------------- checks
def check_init(init: object, choices: tuple[str, ...]) -> str:
    """``init`` if it is one of ``choices``; ``ValueError`` naming them otherwise."""
    if init not in choices:
        raise ValueError(f"init must be one of {choices}, got {init!r}")
    return init  # type: ignore[return-value]


def head_selection(heads: object, num_heads: int, device: torch.device) -> torch.Tensor:
    """Bool mask ``[num_heads]`` of the selected heads: ``None`` (all), a list / tuple / integer
    tensor of indices in ``[0, num_heads)``, or a bool tensor ``[num_heads]``. A bare int, a bool
    or a float index is a ``TypeError``; an index out of range a ``ValueError``."""
    try:
        return selection_mask("heads", heads, num_heads, device, prefix=False, what="head indices")
    except ValueError as err:
        if "must lie in" not in str(err):
            raise
        raise ValueError(f"heads must hold ints in [0, {num_heads}), got {heads!r}") from None


def mask_indices(mask: torch.Tensor) -> list[int]:
    """Indices of the set entries of a 1-D mask (e.g. the heads a slot trains)."""
    return torch.nonzero(mask).flatten().tolist()


# ------------------------------------------------------------------------------------- creation
def lora_init_A(d_in: int, rank: int, *, init: str = "kaiming", seed: int = 0) -> torch.Tensor:
    """The initial ``A`` ``[rank, d_in]`` (float32, CPU) every party derives from ``seed``.

    ``"kaiming"``: PEFT's default ``kaiming_uniform_(a=√5)``, i.e. U(-1/√d_in, 1/√d_in);
    ``"gaussian"``: N(0, 1/rank), as PEFT's ``init_lora_weights="gaussian"``.
    """
    check_positive_int("d_in", d_in)
    check_positive_int("rank", rank)
    check_init(init, LORA_INITS)
    gen = torch.Generator().manual_seed(check_int("seed", seed))
    a = torch.empty(rank, d_in)
    if init == "kaiming":
        bound = 1.0 / math.sqrt(d_in)
        return a.uniform_(-bound, bound, generator=gen)
    return a.normal_(0.0, 1.0 / rank, generator=gen)


def lora_factors(
    d_in: int,
    d_out: int,
    rank: int,
    *,
    init: str = "kaiming",
    seed: int = 0,
    random_b: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh LoRA adapter: ``A`` from :func:`lora_init_A` and ``B`` ``[d_out, rank]`` zeros
    (float32, CPU), so it starts as a no-op. ``random_b`` (PEFT's ``init_lora_weights=False``,
    for tests) draws ``B`` as PEFT does, ``kaiming_uniform_(a=√5)`` from the global generator."""
    check_positive_int("d_out", d_out)
    A = lora_init_A(d_in, rank, init=init, seed=seed)
    B = torch.zeros(d_out, rank)
    if random_b:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    return A, B


def ravan_bases(
    d_in: int, d_out: int, heads: int, rank: int, *, init: str = "orthogonal", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen bases ``A`` ``[h, r, d_in]`` and ``B`` ``[h, d_out, r]`` from ``seed`` (float32, CPU).

    Generated on the CPU with a private generator, so every client derives bitwise-identical
    bases on any device. ``"orthogonal"``: QR of a Gaussian ``[d, h·r]`` split per head, so all
    heads' rows of ``A`` (columns of ``B``) are orthonormal together; where ``h·r > d`` each head
    is orthonormalised on its own (heads then overlap). ``"gaussian"``: entries of ``A`` drawn
    from N(0, 1/d_in) and of ``B`` from N(0, 1/r).

    Orthonormal bases need ``rank <= min(d_in, d_out)``: a head's ``r`` rows of ``A`` cannot be
    orthonormal in a space of ``d_in < r`` dimensions (nor ``B``'s ``r`` columns in ``d_out``);
    that is a ``ValueError`` (use ``init="gaussian"``, whose bases exist for any sizes, or a
    smaller ``rank``). ``heads · rank`` may exceed the dimensions (heads then overlap).
    """
    check_positive_int("d_in", d_in)
    check_positive_int("d_out", d_out)
    check_positive_int("heads", heads)
    check_positive_int("rank", rank)
    check_init(init, RAVAN_INITS)
    seed = check_int("seed", seed)
    if init == "orthogonal" and rank > min(d_in, d_out):
        raise ValueError(
            f"rank={rank} is larger than min(d_in={d_in}, d_out={d_out}): orthonormal bases "
            f"(init='orthogonal') need rank <= {min(d_in, d_out)} (each head's rank rows of A lie "
            f"in R^d_in, its rank columns of B in R^d_out); use a smaller rank or "
            f"init='gaussian'"
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g_a = torch.randn(d_in, heads * rank, generator=gen, dtype=torch.float64)
    g_b = torch.randn(d_out, heads * rank, generator=gen, dtype=torch.float64)
    if init == "gaussian":
        A = (g_a / d_in**0.5).T.reshape(heads, rank, d_in)
        B = (g_b / rank**0.5).reshape(d_out, heads, rank).permute(1, 0, 2)
        return A.float().contiguous(), B.float().contiguous()

    def orthonormal_columns(g: torch.Tensor) -> torch.Tensor:
        if g.shape[1] <= g.shape[0]:
            return _qr_q(g)
        return torch.cat([_qr_q(blk) for blk in g.split(rank, dim=1)], dim=1)

    qa, qb = orthonormal_columns(g_a), orthonormal_columns(g_b)
    A = qa.T.reshape(heads, rank, d_in)
    B = qb.reshape(d_out, heads, rank).permute(1, 0, 2)
    return A.float().contiguous(), B.float().contiguous()


def _qr_q(g: torch.Tensor) -> torch.Tensor:
    """Q of a QR decomposition with a sign convention (diag(R) > 0) so it is unique."""
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))


def ravan_cores(
    heads: int,
    rank: int,
    *,
    slots: tuple[int, ...] = (),
    device: torch.device | str | None = None,
    random_core: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trainable start of a Ravan adapter: cores ``H`` ``[*slots, h, r, r]`` (zeros, so the
    adapter starts as a no-op), scalars ``s`` ``[*slots, h]`` (ones) and a bool head mask
    ``[*slots, h]`` (every head trains), all float32 but the mask. ``random_core`` (PEFT's
    ``init_lora_weights=False``, for tests) draws ``H`` from N(0, 1/r) with the global generator.
    """
    H = torch.zeros(*slots, heads, rank, rank, device=device)
    if random_core:
        H.normal_(0.0, 1.0 / rank)
    s = torch.ones(*slots, heads, device=device)
    return H, s, torch.ones(*slots, heads, dtype=torch.bool, device=device)


# ------------------------------------------------------------------------------------- forward
def lora_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, **op_args: Any) -> torch.Tensor:
    """:func:`fedlora_kernels.masked_lora` (``scale``, masks and segments in ``op_args``) with the
    factors cast to ``x``'s dtype (e.g. fp32 adapters in a bf16 model, or under autocast)."""
    return fk.masked_lora(x, A.to(x.dtype), B.to(x.dtype), **op_args)


def ravan_forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    H: torch.Tensor,
    s: torch.Tensor,
    *,
    head_mask: torch.Tensor | None = None,
    **op_args: Any,
) -> torch.Tensor:
    """:func:`fedlora_kernels.multihead_lora` (``scale``, segments, ``base_out`` in ``op_args``)
    with the bases cast to ``x``'s dtype. ``head_mask`` may be any 0/1 dtype (some PEFT versions
    cast buffers to the base dtype): it is passed as bool, which the op takes without the device
    sync of its 0/1 value check."""
    if head_mask is not None and head_mask.dtype != torch.bool:
        head_mask = head_mask != 0
    return fk.multihead_lora(x, A.to(x.dtype), B.to(x.dtype), H, s, head_mask=head_mask, **op_args)


# ------------------------------------------------------------------------------------- ΔW
def lora_delta_weight(
    A: torch.Tensor, B: torch.Tensor, scale: float, rank_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale · B diag(m) A`` as ``[d_out, d_in]`` float32 (``A`` ``[R, d_in]``, ``B``
    ``[d_out, R]``, ``rank_mask`` ``[R]`` or None for every component); no gradient."""
    B = B.detach().float()
    if rank_mask is not None:
        B = B * rank_mask.float()
    return B @ A.detach().float() * scale


def ravan_delta_weight(
    A: torch.Tensor, B: torch.Tensor, H: torch.Tensor, s: torch.Tensor, scale: float
) -> torch.Tensor:
    """``scale · Σ_i s_i B_i H_i A_i`` as ``[d_out, d_in]`` float32 (one slot: ``H`` ``[h, r, r]``,
    ``s`` ``[h]``); no gradient."""
    core = H.detach().float() * s.detach().float()[:, None, None]
    return torch.einsum("hor,hrq,hqi->oi", B.float(), core, A.float()) * scale
