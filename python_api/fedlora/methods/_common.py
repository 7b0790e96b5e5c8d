"""Building blocks shared by the server rules in :mod:`fedlora.methods`.

State dicts follow DESIGN §2: a LoRA layer at module path ``p`` is ``p.lora_A.weight``
``[R, d_in]`` and ``p.lora_B.weight`` ``[d_out, R]``, paired by path; every other key (a
classifier head, ``modules_to_save``) is weighted-averaged. The rules receive inputs already
validated by :func:`fedlora.aggregate` (keys, shapes, finite values, weights normalised over the
accepted clients) and never modify them in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

import fedlora_kernels as fk
from fedlora.metrics import FactorTerm, factored_sq_norm

State = Mapping[str, torch.Tensor]

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
# keys a server rule returns for the clients to apply to their frozen base (FLoRA's merge, FedEx's
# residual); they are instructions, not adapter parameters, so they are ignored on input
SERVER_SUFFIXES = (".lora_merge_A", ".lora_merge_B", ".lora_residual_A", ".lora_residual_B")


class ClientRejected(Exception):
    """A client update that cannot be aggregated; ``key`` names the offending tensor (or None)."""

    def __init__(self, key: str | None, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


def a_key(path: str) -> str:
    """State-dict key of the ``A`` factor of the LoRA layer at ``path``."""
    return path + A_SUFFIX


def b_key(path: str) -> str:
    """State-dict key of the ``B`` factor of the LoRA layer at ``path``."""
    return path + B_SUFFIX


def lora_paths(state: State) -> list[str]:
    """Module paths of the LoRA layers of ``state`` (those with an ``A`` key), in key order."""
    return [k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX)]


def is_factor_key(key: str) -> bool:
    """True for ``<path>.lora_A.weight`` and ``<path>.lora_B.weight`` keys."""
    return key.endswith((A_SUFFIX, B_SUFFIX))


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
    """``‖B A‖_F`` from factors (HetLoRA's sparsity-weighted aggregation)."""
    return factored_sq_norm([(B, A, 1.0)]) ** 0.5


def declared_rank(meta: Mapping[str, Any], path: str) -> int | None:
    """The rank a client declares for ``path`` in ``meta["rank"]`` (an int for every layer or a
    ``{path: int}`` dict), or None."""
    rank = meta.get("rank")
    if isinstance(rank, Mapping):
        rank = rank.get(path)
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ClientRejected(
            None, f"meta 'rank' must be an int or a {{path: int}} dict, got {rank!r}"
        )
    return rank


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
        wt = torch.tensor(w, dtype=torch.float32)
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
    """:func:`fedlora_kernels.masked_weighted_mean` with the weights as a float32 tensor."""
    wt = torch.tensor([float(x) for x in weights], dtype=torch.float32)
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
    """Running sums ``Σ_k c_kj X_k[j]`` (float32) and ``Σ_k c_kj`` per key and rank index.

    The streaming form of :func:`fedlora_kernels.masked_weighted_mean`: ``add`` one client at a
    time (its tensor may have a shorter rank than the global, meaning a prefix), then ``mean``
    returns ``num / den`` per rank index with a fallback where ``den = 0``, or ``zero_padded``
    returns ``num / Σ_k w_k`` (HetLoRA). Only the sums are kept, never a client.
    """

    def __init__(self, global_state: State) -> None:
        self.global_state = global_state
        self.num: dict[str, torch.Tensor] = {}
        self.den: dict[str, torch.Tensor] = {}
        self.total: dict[str, float] = {}
        self.like: dict[str, torch.Tensor] = {}
        self.full: set[str] = set()  # keys summed by add_full: one denominator, the total weight

    def _view(self, key: str, rank_dim: int) -> list[int]:
        view = [1] * self.like[key].dim()
        if view:
            view[rank_dim] = -1
        return view

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
        """Add ``weight · mask[j] · x[j]`` for the ``r = x.shape[rank_dim]`` leading indices.

        ``like`` gives the full shape of a sum that is not a key of the global state.
        """
        if key in self.full:
            raise ValueError(f"{key!r} was accumulated with add_full(); use one form per key")
        g = self.like.setdefault(key, like if like is not None else self.global_state[key])
        if key not in self.num:
            self.num[key] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            size = g.shape[rank_dim] if g.dim() else 1
            self.den[key] = torch.zeros(size, dtype=torch.float32, device=g.device)
            self.total[key] = 0.0
        r = x.shape[rank_dim] if x.dim() else 1
        coef = torch.full((r,), float(weight), dtype=torch.float32, device=g.device)
        if mask is not None:
            coef = coef * mask[:r].to(device=g.device, dtype=torch.float32)
        c = coef.view(self._view(key, rank_dim)) if g.dim() else coef[0]
        contrib = torch.where(c != 0, x.to(torch.float32) * c, 0.0)
        target = self.num[key].narrow(rank_dim, 0, r) if g.dim() else self.num[key]
        target.add_(contrib)
        self.den[key][:r] += coef
        self.total[key] += float(weight)

    def add_full(self, keys: Sequence[str], state: State, weight: float) -> None:
        """``add`` of whole tensors (global shape, no mask) for many keys in one multi-tensor
        call: the streaming counterpart of :func:`weighted_average`."""
        if not keys:
            return
        for key in keys:
            if key not in self.num:
                g = self.like.setdefault(key, self.global_state[key])
                self.num[key] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
                self.total[key] = 0.0
                self.full.add(key)
            elif key not in self.full:
                raise ValueError(f"{key!r} was accumulated with add(); use one form per key")
            self.total[key] += float(weight)
        xs = [state[k] for k in keys]
        if any(x.dtype != torch.float32 for x in xs):
            xs = [x.float() for x in xs]
        torch._foreach_add_([self.num[k] for k in keys], xs, alpha=float(weight))

    def mean(self, key: str, *, rank_dim: int = 0, fallback: bool = True) -> torch.Tensor:
        """``num / den`` per rank index; the global's value (or 0) where nobody contributed."""
        if key not in self.num:
            g = self.global_state[key]
            return g.clone() if fallback else torch.zeros_like(g)
        g = self.like[key]
        if key in self.full:
            if self.total[key] > 0:
                return (self.num[key] / self.total[key]).to(g.dtype)
            return g.clone() if fallback else torch.zeros_like(g)
        d = self.den[key].view(self._view(key, rank_dim)) if g.dim() else self.den[key][0]
        fb = g.float() if fallback else torch.zeros((), device=g.device)
        out = torch.where(d > 0, self.num[key] / torch.where(d > 0, d, 1.0), fb)
        return out.to(g.dtype)

    def zero_padded(self, key: str) -> torch.Tensor:
        """``num / Σ_k w_k``: missing rank indices count as zeros (zero-padding)."""
        if key not in self.num or self.total[key] <= 0:
            return torch.zeros_like(self.global_state[key])
        g = self.like[key]
        return (self.num[key] / self.total[key]).to(g.dtype)
