"""HetLoRA (zero-padding baseline): heterogeneous client ranks, zero-padded averaging.

Global rank ``R``; client ``k`` trains the rank prefix ``r_k ≤ R`` (``A[:r_k]``, ``B[:, :r_k]``)
and uploads it. The server zero-pads every client to ``R`` and averages:
``A_g[j] = Σ_{k: r_k > j} w_k A_k[j] / Σ_k w_k`` (the same for the columns of ``B``), so a
component held by few clients is shrunk by the weight of the others, and a component no client
holds becomes 0. Weights per layer (``weighting=``):

- ``"sparsity"`` (default, the HetLoRA paper): ``w_k ∝ ‖B_k A_k‖_F`` of that layer (from factors);
  if every client's product is 0 in a layer, the data weights ``p_k`` are used there;
- ``"data"``: ``w_k = p_k``.

Other keys are ``p_k``-averaged. ``metas[k]`` may declare ``{"rank": r_k}`` (or
``{"rank": {path: r_k}}``); a declared rank that disagrees with the uploaded shapes rejects the
client. Client side: :func:`fedlora.methods.prefix.truncate` (the rank-``r_k`` prefix of the
global). Streaming-capable. Every round's ``metrics["segment_norms"]`` holds ``‖ΔW‖_F`` of each
rank segment of the new global (:func:`fedlora.methods.prefix.segment_norms`).

**Rank self-pruning** (the paper's local training, off by default; ``--hetlora-prune``, the
variant is then labelled ``hetlora (hetlora_prune=True)``): with decay factor ``γ``
(``--hetlora-prune-gamma``, default 0.9) client ``k`` of current rank ``r`` keeps the prefix
``q = max(1, ⌊γ r⌋)`` and calls the components ``[q, r)`` its tail. During local training the
tail's norm is regularised: ``λ ‖B_tail A_tail‖_F`` is added to the loss (``--hetlora-prune-lambda``,
default 0.01; its gradient ``λ B_t (A_t A_tᵀ) / n``, ``λ (B_tᵀ B_t) A_t / n`` with
``n = ‖B_t A_t‖_F`` from Gram matrices, added after every backward pass). After local training,
if the tail's norm ``n`` (over all layers: the root of the sum of squares) is smaller than the
tail's norm of the model the client RECEIVED this round (its download, measured before
training), the client prunes: it uploads the rank-``q`` prefix (the tail is dropped, the server
zero-pads it as any smaller rank) and trains at rank ``q`` from then on; otherwise it keeps
``r``. (The paper's text was not available to us; this comparison follows the public
re-implementations, e.g. FederatedScope-based FedLoRA baselines, which compare the updated
tail with the received one. With ``B`` initialised to 0, the first round's received tail is 0,
so nothing is pruned before the tail has grown.) The paper leaves ``λ`` and ``γ`` to tuning;
the defaults here are this library's choices. The pruned ranks live in the client-side object
(the simulator keeps it for the run; a client built afresh every round, as a Flower ClientApp,
starts each round at its budget).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedlora.methods._common import (
    MaskedAccumulator,
    State,
    a_key,
    average_other_keys,
    b_key,
    check_declared_rank,
    factors,
    lora_paths,
    masked_mean,
    normalised,
    other_keys,
    sparsity_weight,
)
from fedlora.methods._protocol import Budget, Client, Method, Option

WEIGHTINGS = ("sparsity", "data")

OPTIONS = (
    Option("hetlora_weighting", "str", "sparsity", "HetLoRA: server weights, ||B_k A_k||_F "
           "(sparsity, the paper) or the data shares", choices=WEIGHTINGS, server="weighting"),
    Option("hetlora_prune", "bool", False, "HetLoRA: the paper's local rank self-pruning "
           "(off by default)"),
    Option("hetlora_prune_gamma", "float", 0.9, "HetLoRA self-pruning: decay factor; a pruning "
           "client keeps floor(gamma * rank) components", low=0.01, high=0.99),
    Option("hetlora_prune_lambda", "float", 0.01, "HetLoRA self-pruning: weight of the tail "
           "norm added to the local loss", low=0.0, high=1e3),
)  # fmt: skip


def check_options(values: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """The pruning parameters mean nothing without pruning."""
    loose = [k for k in ("hetlora_prune_gamma", "hetlora_prune_lambda") if k in given]
    if loose and not values["hetlora_prune"]:
        flags = ", ".join("--" + k.replace("_", "-") for k in loose)
        raise ValueError(f"{flags}: self-pruning is off; add --hetlora-prune or leave them out")


def check_client(global_state: State, state: State, meta: Mapping[str, Any]) -> None:
    """Reject a client whose declared rank disagrees with its uploaded shapes."""
    check_declared_rank(global_state, state, meta)


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def _layer_weights(
    client_states: Sequence[State], weights: Sequence[float], path: str, weighting: str
) -> list[float]:
    if weighting == "data":
        return normalised(weights)
    norms = [sparsity_weight(*factors(cs, path)) for cs in client_states]
    return normalised(norms) if any(norms) else normalised(weights)


def aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    metas: Sequence[Mapping[str, Any]],
    *,
    weighting: str = "sparsity",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HetLoRA's server rule (zero-padded weighted average); see the module docstring."""
    _check_weighting(weighting)
    new_state: dict[str, torch.Tensor] = {}
    layer_weights: dict[str, list[float]] = {}
    for path in lora_paths(global_state):
        w = _layer_weights(client_states, weights, path, weighting)
        total = sum(w)  # 1 up to rounding: the weights come normalised
        layer_weights[path] = list(w)
        for key, dim in ((a_key(path), 0), (b_key(path), 1)):
            g = global_state[key]
            rank = g.shape[dim]
            tensors = [cs[key] for cs in client_states]
            # masked mean over the holders of each index, rescaled to a zero-padded mean
            mean = masked_mean(tensors, w, rank_dim=dim, fallback=torch.zeros_like(g))
            held = torch.zeros(rank, dtype=torch.float32, device=g.device)
            for t, wk in zip(tensors, w, strict=True):
                held[: t.shape[dim]] += wk
            shape = [1, 1]
            shape[dim] = rank
            new_state[key] = (mean.float() * (held / total).view(shape)).to(g.dtype)
    average_other_keys(new_state, global_state, client_states, weights)
    out = {k: new_state[k] for k in global_state}
    return out, {
        "hetlora_weights": layer_weights,
        "segment_norms": round_segment_norms(out, client_states),
    }


def round_segment_norms(state: State, client_states: Sequence[State]) -> dict[str, float]:
    """``‖ΔW‖_F`` per rank segment of ``state``, the segments bounded by the clients' ranks."""
    from fedlora.methods.prefix import segment_bounds, segment_norms

    paths = lora_paths(state)
    if not paths:
        return {}
    ranks = {int(cs[a_key(p)].shape[0]) for cs in client_states for p in paths}
    return segment_norms(dict(state), segment_bounds(int(state[a_key(paths[0])].shape[0]), ranks))


def stream_add(
    acc: MaskedAccumulator,
    state: State,
    weight: float,
    meta: Mapping[str, Any],
    *,
    weighting: str = "sparsity",
) -> None:
    """Add one client: zero-padded running sums with its per-layer weight."""
    _check_weighting(weighting)
    for path in lora_paths(acc.global_state):
        w = weight if weighting == "data" else sparsity_weight(*factors(state, path))
        # the data weight is kept aside for layers where every sparsity weight turns out 0
        acc.add(a_key(path), state[a_key(path)], w, rank_dim=0)
        acc.add(b_key(path), state[b_key(path)], w, rank_dim=1)
        if weighting == "sparsity":
            g = acc.global_state
            acc.add(a_key(path) + "#data", state[a_key(path)], weight, like=g[a_key(path)])
            acc.add(
                b_key(path) + "#data", state[b_key(path)], weight, rank_dim=1, like=g[b_key(path)]
            )
    acc.add_full(other_keys(acc.global_state), state, weight)


def stream_result(
    acc: MaskedAccumulator, *, weighting: str = "sparsity"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Zero-padded means of the layers, weighted means of the other keys."""
    out = {}
    for path in lora_paths(acc.global_state):
        for key, dim in ((a_key(path), 0), (b_key(path), 1)):
            if acc.total.get(key, 0.0) <= 0 and key + "#data" in acc.avg:
                out[key] = acc.zero_padded(key + "#data", rank_dim=dim)
                out[key] = out[key].to(acc.global_state[key].dtype)
            else:
                out[key] = acc.zero_padded(key, rank_dim=dim)
    for key in other_keys(acc.global_state):
        out[key] = acc.mean(key)
    return {k: out[k] for k in acc.global_state}, {}


class PrefixClient(Client):
    """Client of a prefix-rank method (HetLoRA, and the base of FlexLoRA's and PreLort's):
    client ``k`` receives the rank-``r_k`` prefix ``A[:r_k]``, ``B[:, :r_k]``, trains it and
    uploads it with ``{"rank": r_k}``."""

    def download(self, global_state: State, budget: Budget) -> dict[str, torch.Tensor]:
        from fedlora.methods import prefix

        return prefix.truncate(dict(global_state), budget.rank)

    def upload(
        self, model: nn.Module, slot: int, budget: Budget
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from fedlora.methods import prefix

        state, _ = super().upload(model, slot, budget)
        return prefix.truncate(state, budget.rank), {"rank": budget.rank}


def tail_norm(model: nn.Module, slot: int, rank: int, keep: int) -> float:
    """``n = sqrt(Σ_layers ‖B[:, keep:rank] A[keep:rank]‖_F²)`` of ``slot`` (Gram matrices)."""
    from fedlora.state_dict import adapter_layers

    total = 0.0
    for _, layer in adapter_layers(model):
        A = layer.lora_A[slot, keep:rank].detach().double()
        B = layer.lora_B[slot, :, keep:rank].detach().double()
        total += float(torch.sum((B.T @ B) * (A @ A.T)).clamp_min(0.0))
    return total**0.5


class HetLoRAClient(PrefixClient):
    """HetLoRA's client: a :class:`PrefixClient`, with the paper's rank self-pruning when
    ``hetlora_prune`` is on (module docstring)."""

    OPTIONS = OPTIONS

    def __init__(self, options: Any, budgets: Sequence[Budget]) -> None:
        super().__init__(options, budgets)
        #: per client (its Budget object, the same every round in the simulator): current rank
        self.ranks: dict[int, int] = {}
        #: per slot: its budget, and the tail norm of the state it received this round
        self._slot_budget: dict[int, Budget] = {}
        self._received: dict[int, float] = {}

    def rank(self, budget: Budget) -> int:
        """The client's current rank (its budget's, less what it pruned)."""
        return self.ranks.get(id(budget), budget.rank)

    def keep(self, rank: int) -> int:
        """``q = max(1, ⌊γ r⌋)``: the prefix a pruning client of rank ``rank`` keeps."""
        return max(1, int(self.option("hetlora_prune_gamma") * rank + 1e-9))

    def download(self, global_state: State, budget: Budget) -> dict[str, torch.Tensor]:
        from fedlora.methods import prefix

        return prefix.truncate(dict(global_state), self.rank(budget))

    def prepare(self, model: nn.Module, slot: int, state: State, budget: Budget, seed: int) -> None:
        super().prepare(model, slot, state, budget, seed)
        self._slot_budget[slot] = budget
        if self.option("hetlora_prune"):
            r = self.rank(budget)
            self._received[slot] = tail_norm(model, slot, r, self.keep(r))

    @torch.no_grad()
    def after_backward(self, model: nn.Module, slots: list[int]) -> None:
        lam = self.option("hetlora_prune_lambda")
        if not self.option("hetlora_prune") or lam == 0:
            return
        from fedlora.state_dict import adapter_layers

        for slot in slots:
            r = self.rank(self._slot_budget[slot])
            q = self.keep(r)
            if q >= r:
                continue
            for _, layer in adapter_layers(model):
                A, B = layer.lora_A[slot, q:r], layer.lora_B[slot, :, q:r]
                ga, gb = A @ A.T, B.T @ B
                n = float(torch.sum(gb * ga).clamp_min(0.0)) ** 0.5
                if n == 0 or layer.lora_A.grad is None or layer.lora_B.grad is None:
                    continue
                layer.lora_B.grad[slot, :, q:r] += (lam / n) * (B @ ga)
                layer.lora_A.grad[slot, q:r] += (lam / n) * (gb @ A)

    def upload(
        self, model: nn.Module, slot: int, budget: Budget
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from fedlora.methods import prefix
        from fedlora.state_dict import get_adapter_state_dict

        r = self.rank(budget)
        if self.option("hetlora_prune"):
            q = self.keep(r)
            received = self._received.pop(slot, None)
            if q < r and received is not None and tail_norm(model, slot, r, q) < received:
                self.ranks[id(budget)] = r = q  # pruned: the tail is not sent
        state = get_adapter_state_dict(model, slot=slot)
        return prefix.truncate(state, r), {"rank": r}


METHOD = Method(
    name="hetlora",
    layer="lora",
    ranks="prefix",
    aggregate=aggregate,
    client=HetLoRAClient,
    check_client=check_client,
    stream_add=stream_add,
    stream_result=stream_result,
    budget_fields=("rank", "steps"),
    summary="HetLoRA baseline: rank prefixes, zero-padded sparsity-weighted average",
    options=OPTIONS,
    check_options=check_options,
    logged=("segment_norms",),
)
