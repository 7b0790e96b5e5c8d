"""Building blocks shared by the server rules in :mod:`fedlora.methods`.

State dicts follow DESIGN §2: a LoRA layer at module path ``p`` is ``p.lora_A.weight``
``[R, d_in]`` and ``p.lora_B.weight`` ``[d_out, R]``, paired by path; every other key (a
classifier head, ``modules_to_save``) is weighted-averaged. The rules receive inputs already
validated by :func:`fedlora.aggregate` (keys, shapes, finite values, weights normalised over the
accepted clients) and never modify them in place.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import fedlora_kernels as fk
from fedlora.keys import (  # noqa: F401  (re-exported: the rules import them from here)
    A_SUFFIX,
    B_SUFFIX,
    SERVER_SUFFIXES,
    a_key,
    b_key,
    is_factor_key,
    lora_paths,
)
from fedlora.metrics import FactorTerm, factored_sq_norm

State = Mapping[str, torch.Tensor]


class ClientRejected(Exception):
    """A client update that cannot be aggregated; ``key`` names the offending tensor (or None)."""

    def __init__(self, key: str | None, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


def other_keys(state: State) -> list[str]:
    """Keys that are not LoRA factors (classifier heads, ``modules_to_save``): averaged."""
    return [k for k in state if not is_factor_key(k)]


def factors(state: State, path: str, global_state: State | None = None) -> tuple:
    """``(B, A)`` of one layer; a missing ``A`` (FFA-LoRA clients may omit the frozen ``A``) is
    taken from ``global_state``."""
    A = state.get(a_key(path))
    if A is None and global_state is not None:
        A = global_state[a_key(path)]
    return state[b_key(path)], A


def rank_of(state: State, path: str) -> int:
    """Rank of the layer at ``path`` in ``state`` (rows of its ``B``'s columns)."""
    return int(state[b_key(path)].shape[1])


def ideal_terms(
    client_states: Sequence[State], weights: Sequence[float], path: str, global_state: State
) -> list[FactorTerm]:
    """``[(B_k, A_k, p_k)]``: the exact weighted average ``Σ p_k B_k A_k`` of one layer."""
    return [
        (*factors(cs, path, global_state), float(w))
        for cs, w in zip(client_states, weights, strict=True)
    ]


def sparsity_weight(B: torch.Tensor, A: torch.Tensor) -> float:
    """``‖B A‖_F`` from factors (HetLoRA's sparsity-weighted aggregation).

    Scaled first: ``‖B A‖ = max|B| · max|A| · ‖(B / max|B|)(A / max|A|)‖``, with the Gram products
    in float64 on factors of magnitude at most 1, so neither tiny (1e-30) nor huge (1e30) float32
    factors underflow or overflow (every float32 product of two factors is a normal float64).
    """
    sb, sa = float(B.abs().max()) if B.numel() else 0.0, float(A.abs().max()) if A.numel() else 0.0
    if sb == 0.0 or sa == 0.0:
        return 0.0
    unit = factored_sq_norm([(B.double() / sb, A.double() / sa, 1.0)]) ** 0.5
    return sb * sa * unit


def normalised(weights: Sequence[float]) -> list[float]:
    """``w_k / Σ_j w_j`` computed without overflow or underflow for any finite non-negative
    weights (divided by the largest first, so ``[1e308, 1e308]`` gives ``[0.5, 0.5]``); all
    zeros when every weight is 0."""
    w = [float(x) for x in weights]
    top = max(w, default=0.0)
    if top <= 0.0:
        return [0.0 for _ in w]
    w = [x / top for x in w]
    total = sum(w)
    return [x / total for x in w]


def index_list(value: Any, what: str, key: str | None, size: int) -> list[int]:
    """A client's list of distinct indices in ``[0, size)`` from its meta (a list, tuple or 1-D
    integer tensor of ints; numpy integers count as ints, bools and floats do not), or
    :class:`ClientRejected` naming ``what`` and the offending entry."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise ClientRejected(
                key, f"meta {what!r} must be a list of ints, got a {value.dtype} tensor"
            )
        value = value.tolist()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ClientRejected(
            key, f"meta {what!r} must be a list of ints, got {type(value).__name__}"
        )
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < size:
            raise ClientRejected(
                key, f"meta {what!r} entries must be ints in [0, {size}), got {v!r}"
            )
        out.append(int(v))
    if len(set(out)) != len(out):
        raise ClientRejected(key, f"meta {what!r} has repeated indices: {out}")
    return out


def per_layer(meta: Mapping[str, Any], name: str, paths: Sequence[str]) -> Mapping[str, Any]:
    """``meta[name]`` as a ``{path: value}`` dict (empty when absent), rejecting a value that is
    not a dict and layer paths the global state does not have (a typo would otherwise be read
    as "no entry for this layer")."""
    value = meta.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ClientRejected(
            None,
            f"meta {name!r} must be a {{path: ...}} dict keyed by layer path, got {type(value).__name__}",
        )
    unknown = [p for p in value if p not in paths]
    if unknown:
        raise ClientRejected(
            None, f"meta {name!r} names layers not in the global state: {unknown[:3]}"
        )
    return value


def declared_rank(meta: Mapping[str, Any], path: str) -> int | None:
    """The rank a client declares for ``path`` in ``meta["rank"]`` (an int for every layer or a
    ``{path: int}`` dict), or None."""
    rank = meta.get("rank")
    if isinstance(rank, Mapping):
        rank = rank.get(path)
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ClientRejected(
            None, f"meta 'rank' must be an int or a {{path: int}} dict, got {rank!r}"
        )
    return int(rank)


def check_declared_rank(global_state: State, state: State, meta: Mapping[str, Any]) -> None:
    """Reject a client whose uploaded shapes disagree with the rank it declares in its meta."""
    for path in lora_paths(global_state):
        want = declared_rank(meta, path)
        if want is not None and b_key(path) in state and rank_of(state, path) != want:
            raise ClientRejected(
                b_key(path),
                f"meta declares rank {want} but the uploaded factors have rank "
                f"{rank_of(state, path)}",
            )


# ------------------------------------------------------------------------------------------------
# reductions over clients
# ------------------------------------------------------------------------------------------------


def weighted_average(
    client_states: Sequence[State],
    weights: Sequence[float],
    keys: Sequence[str],
    like: State,
) -> dict[str, torch.Tensor]:
    """``Σ_k w_k X_k / Σ_k w_k`` for each of ``keys`` (same shape on every client), float32
    accumulation, result in the dtype of ``like[key]`` (the clients' tensors are expected in that
    dtype, as :func:`fedlora.aggregate` delivers them).

    On CUDA every key is one :func:`fedlora_kernels.masked_weighted_mean` launch that reads all
    clients in place. On CPU the sum runs client by client with one multi-tensor ``_foreach``
    call per client, which costs one dispatch per client instead of one per client and key.
    """
    if not keys:
        return {}
    if not client_states:
        raise ValueError("weighted_average needs at least one client")
    w = [float(x) for x in weights]
    total = sum(w)
    if like[keys[0]].device.type == "cuda":
        wt = torch.tensor(w, dtype=torch.float64)
        return {
            k: fk.masked_weighted_mean([cs[k] for cs in client_states], wt).to(like[k].dtype)
            for k in keys
        }
    acc = [torch.zeros(like[k].shape, dtype=torch.float32, device=like[k].device) for k in keys]
    upcast = any(like[k].dtype != torch.float32 for k in keys)
    for cs, wk in zip(client_states, w, strict=True):
        xs = [cs[k] for k in keys]
        if upcast:
            xs = [x.float() for x in xs]
        torch._foreach_add_(acc, xs, alpha=wk)
    torch._foreach_div_(acc, total)
    return {k: a.to(like[k].dtype) for k, a in zip(keys, acc, strict=True)}


def masked_mean(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    mask: torch.Tensor | None = None,
    *,
    rank_dim: int,
    fallback: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fedlora_kernels.masked_weighted_mean` with the weights as a float64 tensor."""
    # float64: a weight far below the others (1e-270 relative) still counts where it is the
    # only contributor; the op normalises in float64
    wt = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    return fk.masked_weighted_mean(list(tensors), wt, mask, rank_dim=rank_dim, fallback=fallback)


def linear_combination(
    tensors: Sequence[torch.Tensor], coefs: Sequence[float], dtype: torch.dtype
) -> torch.Tensor:
    """``Σ_i c_i T_i`` (coefficients of any sign), float32 accumulation in order, in ``dtype``."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for t, c in zip(tensors, coefs, strict=True):
        acc.add_(t.float(), alpha=float(c))
    return acc.to(dtype)


def average_other_keys(
    new_state: dict[str, torch.Tensor],
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
) -> None:
    """Fill ``new_state`` with the weighted average of every non-factor key of the global."""
    keys = [k for k in other_keys(global_state) if k not in new_state]
    new_state.update(weighted_average(client_states, weights, keys, global_state))


# ------------------------------------------------------------------------------------------------
# streaming: exact running sums
# ------------------------------------------------------------------------------------------------


class MaskedAccumulator:
    """Running weighted means ``Σ_k c_kj X_k[j] / Σ_k c_kj`` per key and rank index.

    The streaming form of :func:`fedlora_kernels.masked_weighted_mean`: ``add`` one client at a
    time (its tensor may have a shorter rank than the global, meaning a prefix), then ``mean``
    returns the mean per rank index with a fallback where nobody contributed, or
    ``zero_padded`` returns ``Σ_k c_kj X_k[j] / Σ_k w_k`` (HetLoRA). Only the running means and
    weight sums are kept, never a client.

    Overflow- and underflow-safe for any finite input: the state is a running mean (each update
    is a convex combination of the old mean and the new client, so it stays within the range
    of the inputs), in float64, and each key's weights are held relative to the largest weight
    it has seen, so ``1e308`` and ``1e-300`` weights, values near the float32 maximum, and a
    tiny value of a lone tiny-weight contributor all come out as a batch call gives them.
    """

    def __init__(self, global_state: State) -> None:
        self.global_state = global_state
        self.avg: dict[str, torch.Tensor] = {}  # running means, float64
        self.den: dict[str, torch.Tensor] = {}  # per rank index: Σ c_kj (relative to scale)
        self.total: dict[str, float] = {}  # Σ w_k (relative to scale)
        self.like: dict[str, torch.Tensor] = {}
        self.scale: dict[str, float] = {}  # per key: the weight that counts as 1
        self.full: set[str] = set()  # keys summed by add_full: one denominator, the total weight

    def _view(self, key: str, rank_dim: int) -> list[int]:
        view = [1] * self.like[key].dim()
        if view:
            view[rank_dim] = -1
        return view

    def _coef(self, key: str, weight: float) -> float:
        """``weight`` relative to the key's scale; a new largest weight becomes the scale (the
        key's weight sums are rescaled; its means do not depend on the scale)."""
        weight = float(weight)
        old = self.scale.get(key, 0.0)
        if weight > old:
            if old > 0:
                ratio = old / weight
                if key in self.den:
                    self.den[key].mul_(ratio)
                self.total[key] *= ratio
            self.scale[key] = old = weight
        return weight / old if old > 0 else 0.0

    def _start(self, key: str, like: torch.Tensor | None, rank_dim: int | None) -> None:
        g = self.like.setdefault(key, like if like is not None else self.global_state[key])
        self.avg[key] = torch.zeros(g.shape, dtype=torch.float64, device=g.device)
        if rank_dim is not None:
            size = g.shape[rank_dim] if g.dim() else 1
            self.den[key] = torch.zeros(size, dtype=torch.float64, device=g.device)
        self.total[key] = 0.0

    def add(
        self,
        key: str,
        x: torch.Tensor,
        weight: float,
        *,
        rank_dim: int = 0,
        mask: torch.Tensor | None = None,
        like: torch.Tensor | None = None,
    ) -> None:
        """Add ``weight · mask[j]`` times ``x[j]`` for the ``r = x.shape[rank_dim]`` leading
        indices.

        ``like`` gives the full shape of a sum that is not a key of the global state.
        """
        if key in self.full:
            raise ValueError(f"{key!r} was accumulated with add_full(); use one form per key")
        if key not in self.avg:
            self._start(key, like, rank_dim)
        g = self.like[key]
        w = self._coef(key, weight)
        self.total[key] += w
        r = x.shape[rank_dim] if x.dim() else 1
        coef = torch.full((r,), w, dtype=torch.float64, device=g.device)
        if mask is not None:
            coef = coef * mask[:r].to(device=g.device, dtype=torch.float64)
        den = self.den[key][:r]
        new = den + coef
        safe = torch.where(new > 0, new, 1.0)
        keep, take = den / safe, coef / safe  # convex: keep + take = 1 where new > 0
        shape = self._view(key, rank_dim)
        keep = keep.view(shape) if g.dim() else keep[0]
        take = take.view(shape) if g.dim() else take[0]
        target = self.avg[key].narrow(rank_dim, 0, r) if g.dim() else self.avg[key]
        target.copy_(torch.where(take > 0, target * keep + x.to(torch.float64) * take, target))
        den.copy_(new)

    def add_full(self, keys: Sequence[str], state: State, weight: float) -> None:
        """``add`` of whole tensors (global shape, no mask) for many keys in multi-tensor calls:
        the streaming counterpart of :func:`weighted_average`."""
        if not keys:
            return
        groups: dict[tuple[float, float], list[str]] = {}
        for key in keys:
            if key not in self.avg:
                self._start(key, None, None)
                self.full.add(key)
            elif key not in self.full:
                raise ValueError(f"{key!r} was accumulated with add(); use one form per key")
            w = self._coef(key, weight)
            old = self.total[key]
            self.total[key] = new = old + w
            if new > 0:
                groups.setdefault((old / new, w / new), []).append(key)
        for (keep, take), group in groups.items():  # one group unless scales differ per key
            avgs = [self.avg[k] for k in group]
            torch._foreach_mul_(avgs, keep)
            torch._foreach_add_(avgs, [state[k].to(torch.float64) for k in group], alpha=take)

    def mean(self, key: str, *, rank_dim: int = 0, fallback: bool = True) -> torch.Tensor:
        """The mean per rank index; the global's value (or 0) where nobody contributed."""
        if key not in self.avg:
            g = self.global_state[key]
            return g.clone() if fallback else torch.zeros_like(g)
        g = self.like[key]
        if key in self.full:
            if self.total[key] > 0:
                return self.avg[key].to(g.dtype)
            return g.clone() if fallback else torch.zeros_like(g)
        d = self.den[key].view(self._view(key, rank_dim)) if g.dim() else self.den[key][0]
        fb = g.double() if fallback else torch.zeros((), device=g.device, dtype=torch.float64)
        return torch.where(d > 0, self.avg[key], fb).to(g.dtype)

    def zero_padded(self, key: str, *, rank_dim: int = 0) -> torch.Tensor:
        """``Σ_k c_kj X_k[j] / Σ_k w_k``: missing rank indices count as zeros (zero-padding)."""
        if key not in self.avg or self.total[key] <= 0:
            return torch.zeros_like(self.global_state[key])
        g = self.like[key]
        if key in self.full:
            return self.avg[key].to(g.dtype)
        share = self.den[key] / self.total[key]
        share = share.view(self._view(key, rank_dim)) if g.dim() else share[0]
        return (self.avg[key] * share).to(g.dtype)
