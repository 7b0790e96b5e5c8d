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

The Triton kernel, its pointer table of clients and its registration live in
:mod:`fedlora_kernels.ops._masked_mean_triton`; this module validates and dispatches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fedlora_kernels import reference
from fedlora_kernels._dispatch import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    resolve_backend,
    values_unavailable,
)

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
        backend: ``"triton"``, ``"torch"`` or ``"c"``; default by device (see
            ``FEDLORA_BACKEND``): CUDA tensors run the Triton kernel, CPU tensors the C library
            (libfedlora, ``csrc/``; float32/bfloat16, bitwise the reference's result) when it is
            built, else the torch reference.

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
    p = _prepare_masked_weighted_mean(tensors, weights, mask, rank_dim, fallback)
    tensors, weights, mask = p.tensors, p.weights, p.mask
    args = dict(rank_dim=p.rank_dim, fallback=fallback, rank=p.rank, dtype=p.dtype)
    chosen = resolve_backend(backend, p.device, c_op="masked_weighted_mean")
    if chosen == "c" and tensors and _c_supported(p, fallback):
        return _masked_weighted_mean_c(p, fallback)
    if not tensors or chosen != "triton":
        return reference.masked_weighted_mean(tensors, weights, mask, **args)
    coef, has = reference.masked_mean_coefficients(weights, mask, p.ranks, p.rank)
    # clients with nothing to read (rank 0, or an empty tensor) have no table row
    keep = [k for k, x in enumerate(tensors) if x.numel()]
    if not keep:
        return reference.masked_weighted_mean(tensors, weights, mask, **args)
    if len(keep) < len(tensors):
        tensors, coef = [tensors[k] for k in keep], coef[keep]
    from fedlora_kernels.ops import _masked_mean_triton as impl

    return impl.masked_weighted_mean(
        tensors, coef.contiguous(), has.to(torch.float32), fallback, p.rank_dim, p.rank, p.dtype
    )


def _c_supported(p: _MeanArgs, fallback: torch.Tensor | None) -> bool:
    """The C path takes float32/bfloat16 values it can read (not while tracing), non-empty."""
    from fedlora_kernels import _clib

    dtypes = {p.tensors[0].dtype, p.dtype}
    return (
        dtypes <= set(_clib.DTYPES)
        and not values_unavailable(*p.tensors, fallback)
        and all(s > 0 for s in _full_shape(p, fallback))
    )


def _full_shape(p: _MeanArgs, fallback: torch.Tensor | None) -> list[int]:
    shape = list(fallback.shape if fallback is not None else p.tensors[0].shape)
    shape[p.rank_dim] = p.rank
    return shape


def _masked_weighted_mean_c(p: _MeanArgs, fallback: torch.Tensor | None) -> torch.Tensor:
    """The CPU path through libfedlora: the reference's coefficients, then its float32 sum in
    client order (``fedlora_masked_combine``), threads over the output."""
    from fedlora_kernels import _clib

    coef, has = reference.masked_mean_coefficients(p.weights, p.mask, p.ranks, p.rank)
    shape = _full_shape(p, fallback)
    outer = math.prod(shape[: p.rank_dim])
    inner = math.prod(shape[p.rank_dim + 1 :])
    out = torch.empty(shape, dtype=p.dtype)
    tensors = [x.detach().contiguous() for x in p.tensors]
    fb = None if fallback is None else fallback.detach().contiguous()
    return _clib.masked_combine(
        tensors, p.ranks, coef, has, out, outer=outer, rank=p.rank, inner=inner, fallback=fb
    )


class _MeanArgs(NamedTuple):
    """Validated arguments of :func:`masked_weighted_mean`."""

    tensors: list[torch.Tensor]
    weights: torch.Tensor  # [C] on the clients' device, in the caller's precision
    mask: torch.Tensor | None  # [C, R] on the clients' device
    rank_dim: int  # in [0, ndim)
    ranks: list[int]  # r_k
    rank: int  # the full rank R
    dtype: torch.dtype  # of the result
    device: torch.device


def _prepare_masked_weighted_mean(
    tensors: object,
    weights: object,
    mask: torch.Tensor | None,
    rank_dim: object,
    fallback: torch.Tensor | None,
) -> _MeanArgs:
    """Validate the arguments of :func:`masked_weighted_mean` (``ValueError``/``TypeError``
    naming the argument) and normalise them."""
    tensors, ref, rank_dim, ranks = _check_clients(tensors, fallback, rank_dim)
    device = check_same_device(**{"tensors[0]" if tensors else "fallback": ref})
    if fallback is not None:
        _check_fallback(fallback, ref, rank_dim, device)
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
    weights = _check_weights(weights, len(tensors), device)
    if mask is not None:
        mask = _check_mask(mask, len(tensors), full_rank, device)
    if not values_unavailable(weights, mask):
        for name, t in (("weights", weights), ("mask", mask)):
            if t is not None and t.numel() and not bool(((t >= 0) & torch.isfinite(t)).all()):
                raise ValueError(f"{name} must be finite and non-negative, got {t.tolist()}")
    dtype = fallback.dtype if fallback is not None else ref.dtype
    return _MeanArgs(tensors, weights, mask, rank_dim, ranks, full_rank, dtype, device)


def _check_clients(
    tensors: object, fallback: torch.Tensor | None, rank_dim: object
) -> tuple[list[torch.Tensor], torch.Tensor, int, list[int]]:
    """The client list: ``(tensors, reference tensor, rank_dim in [0, ndim), ranks)``."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a list of C client tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if fallback is not None:
        check_tensor("fallback", fallback, dtypes=FLOAT_DTYPES)
    if not tensors and fallback is None:
        raise ValueError("tensors is empty: give at least one client tensor or a fallback")
    ref = tensors[0] if tensors else fallback
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
    other = _other_dims(ref, rank_dim)
    ranks = []
    for k, x in enumerate(tensors):
        if x.dim() != ndim or _other_dims(x, rank_dim) != other:
            raise ValueError(
                f"tensors[{k}] must match tensors[0] ({list(ref.shape)}) except along rank_dim="
                f"{rank_dim}, got shape {list(x.shape)}"
            )
        ranks.append(int(x.shape[rank_dim]))
    for k, x in enumerate(tensors):
        if x.device != ref.device:
            raise ValueError(
                f"tensors[{k}] is on {x.device}, tensors[0] on {ref.device}: use one device"
            )
    return tensors, ref, rank_dim, ranks


def _other_dims(x: torch.Tensor, rank_dim: int) -> list[int]:
    return [s for i, s in enumerate(x.shape) if i != rank_dim]


def _check_fallback(
    fallback: torch.Tensor, ref: torch.Tensor, rank_dim: int, device: torch.device
) -> None:
    if fallback.dim() != ref.dim() or _other_dims(fallback, rank_dim) != _other_dims(ref, rank_dim):
        raise ValueError(
            f"fallback must have the clients' shape except along rank_dim={rank_dim} "
            f"(clients: {list(ref.shape)}), got shape {list(fallback.shape)}"
        )
    if fallback.device != device:
        raise ValueError(
            f"fallback is on {fallback.device}, the tensors on {device}: use one device"
        )


def _check_weights(weights: object, num_clients: int, device: torch.device) -> torch.Tensor:
    """``[C]`` real weights on ``device`` (a sequence of numbers becomes float64)."""
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
    return weights.to(device=device)


def _check_mask(
    mask: torch.Tensor, num_clients: int, full_rank: int, device: torch.device
) -> torch.Tensor:
    check_tensor("mask", mask, ndim=2, dtypes=None)
    if mask.is_complex():
        raise TypeError(f"mask must be real (0/1), got dtype {mask.dtype}")
    if list(mask.shape) != [num_clients, full_rank]:
        raise ValueError(
            f"mask must have shape [C={num_clients}, R={full_rank}], got {list(mask.shape)}"
        )
    if mask.device.type == "meta" and device.type != "meta":
        raise ValueError(f"mask is on the meta device (no values), the tensors on {device}")
    return mask.to(device=device)
