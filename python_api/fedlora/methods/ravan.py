"""Ravan: multi-head LoRA with frozen shared bases; clients train a budget of heads.

Client side. Every layer is a :class:`fedlora.RavanLinear` whose bases ``A_i``, ``B_i`` derive from a
shared seed, so only the cores travel. Client ``c`` with budget ``K_c`` trains ``K_c`` heads in
every layer, chosen per layer by a score (:func:`select_heads`):

- ``"weight"`` (the default): ``‖s_i H_i‖_F`` of the current (global) adapter. It costs nothing
  (no extra batch: ``gradient`` spends one local batch per round on scoring only), depends only
  on the global every client received, and in round 1, where every core is 0, it is a seeded
  random choice per client, so clients spread over the heads; later it keeps training the heads
  that carry the most of the global update;
- ``"gradient"``: ``‖∂L/∂H_i‖_F`` on the first local batch (run one forward/backward with all heads
  trainable before selecting; the gradients are read from ``lora_H.grad``): the heads the
  client's own data pulls on hardest;
- ``"random"``: a seeded random choice.

Ties (e.g. ``H = 0`` in the first round, where every weight score is 0) are broken by a seeded
random order, so clients do not all pick heads 0..K-1.

Upload (:func:`client_update`, DESIGN §4): ``s_i·H_i`` of the ``K_c`` TRAINED heads only, as
``<path>.lora_H`` ``[K_c, r, r]`` with ``meta["heads"][path]`` their indices (aligned with the
rows) and no ``lora_s`` (folded in, ``s = 1``), so the upload shrinks with the budget
(``K_c/h`` of the full cores). The full form (``lora_H`` ``[h, r, r]`` for every head, optional
``lora_s`` ``[h]``, ``meta["heads"]`` optionally naming the trained ones) stays accepted.

Step size. The layers use ``scale = 1`` (the paper's update ``Σ_i s_i B_i H_i A_i`` has no extra
factor): unlike LoRA's ``alpha / r`` it does not change with ``--rank`` or ``--heads``, so the
learning rate means the same at every shape; ``--alpha`` does not apply to Ravan.

Server side (:func:`aggregate`). Per layer and head ``i``, over the clients ``S_i`` that trained
it: ``H_i ← Σ_{k∈S_i} p_k s_i^k H_i^k / Σ_{k∈S_i} p_k``, unchanged (``s_i H_i`` of the global) if
``S_i`` is empty; then ``s_i ← 1``. With every head trained by every client this is exactly
``Σ_k p_k ΔW_k`` (the bases are shared), so the aggregation error is 0 up to rounding.

State-dict keys: ``<path>.lora_H`` ``[K, r, r]`` (``K = h``: every head; ``K < h``: the heads
``meta["heads"][path]`` names, in that order, required then) and ``<path>.lora_s`` ``[K]``
(optional: 1 when omitted); any other key (a classifier head) is weighted-averaged over all
accepted clients. ``metas[k]`` may hold ``{"heads": {<path>: [trained head indices]}}``; a full
layer missing there counts as fully trained.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

import fedlora_kernels as fk
from fedlora.layers.ravan import RavanLinear
from fedlora.methods._common import (
    ClientRejected,
    index_list,
    normalised,
    per_layer,
    weighted_average,
)
from fedlora.methods._protocol import Budget, Client, ClientOptions, Method, Option

SCORES = ("weight", "gradient", "random")
_SUFFIXES = (".lora_H", ".lora_s")


def ravan_layers(model: nn.Module) -> list[tuple[str, RavanLinear]]:
    """``(path, layer)`` of every :class:`RavanLinear` in ``model``."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, RavanLinear)]
    if not layers:
        raise ValueError("model has no RavanLinear layers: fedlora.inject(model, 'ravan', ...)")
    return layers


def head_scores(
    model: nn.Module, score: str = "weight", *, slot: int = 0
) -> dict[str, torch.Tensor]:
    """Per-layer head scores ``[h]`` used by :func:`select_heads` (``"weight"`` or ``"gradient"``)."""
    if score not in ("weight", "gradient"):
        raise ValueError(f"score must be 'weight' or 'gradient' here, got {score!r}")
    out = {}
    for path, layer in ravan_layers(model):
        layer._check_slot(slot)
        if score == "weight":
            core = layer.lora_H[slot].detach() * layer.lora_s[slot].detach()[:, None, None]
        else:
            if layer.lora_H.grad is None:
                raise ValueError(
                    f"score='gradient' needs lora_H.grad of {path!r}: run forward/backward on the "
                    "first local batch with all heads trainable before selecting"
                )
            core = layer.lora_H.grad[slot]
        out[path] = torch.linalg.matrix_norm(core.float()).cpu()
    return out


def select_heads(
    model: nn.Module,
    budget: int,
    score: str = "weight",
    *,
    slot: int = 0,
    seed: int = 0,
) -> dict[str, list[int]]:
    """Choose ``budget`` heads per layer for ``slot`` and make only those trainable.

    Returns ``{path: sorted head indices}`` (the same count in every layer). ``seed`` drives the
    ``"random"`` score and the tie-breaking order; use a different seed per client and round.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    layers = ravan_layers(model)
    heads = layers[0][1].heads
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= heads:
        raise ValueError(f"budget must be an int in [1, {heads}] (heads per layer), got {budget!r}")
    scores = head_scores(model, score, slot=slot) if score != "random" else None
    selection: dict[str, list[int]] = {}
    for path, layer in layers:
        gen = torch.Generator().manual_seed((int(seed) * 7919 + zlib.crc32(path.encode())) % 2**31)
        order = torch.randperm(layer.heads, generator=gen)
        if scores is not None:
            # stable sort of a random permutation by descending score: ties fall in random order
            ranked = order[torch.sort(-scores[path][order], stable=True).indices]
        else:
            ranked = order
        chosen = sorted(ranked[:budget].tolist())
        layer.set_trainable_heads(chosen, slot)
        selection[path] = chosen
    return selection


def client_update(
    model: nn.Module, *, slot: int = 0, modules_to_save: Sequence[str] = (), compact: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What a client uploads after local training: ``(state, meta)``.

    ``meta = {"heads": {path: trained heads}}``. With ``compact`` (default)
    ``state[<path>.lora_H] = (s ⊙ H)[heads]`` ``[K, r, r]`` (float32, rows aligned with
    ``meta["heads"][path]``) and no ``lora_s``: ``K/h`` of the full cores. ``compact=False``:
    ``s ⊙ H`` of every head ``[h, r, r]`` and ``lora_s = 1``. Plus the ``modules_to_save``
    parameters either way.
    """
    from fedlora.state_dict import get_adapter_state_dict

    state = get_adapter_state_dict(model, slot=slot, modules_to_save=modules_to_save)
    heads = {}
    for path, layer in ravan_layers(model):
        h_key, s_key = f"{path}.lora_H", f"{path}.lora_s"
        trained = layer.trainable_heads(slot)
        folded = state[h_key] * state[s_key][:, None, None]
        if compact:
            state[h_key] = folded[trained].clone()
            del state[s_key]
        else:
            state[h_key] = folded
            state[s_key] = torch.ones_like(state[s_key])
        heads[path] = trained
    return state, {"heads": heads}


def _paths(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".lora_H")] for k in state if k.endswith(".lora_H")]


def trained_heads(
    global_state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> dict[str, list[int]]:
    """The validated ``meta["heads"]``: ``{path: distinct head indices in [0, h)}`` for the
    layers it names (a layer it does not name counts as fully trained)."""
    paths = _paths(global_state)
    heads = per_layer(meta, "heads", paths)
    out = {}
    for path, value in heads.items():
        h = global_state[f"{path}.lora_H"].shape[0]
        out[path] = index_list(value, "heads", f"{path}.lora_H", h)
    return out


def check_client(
    global_state: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> None:
    """Reject a client whose ``meta["heads"]`` is not a ``{path: [head index, ...]}`` dict of
    distinct ints in ``[0, h)`` over the global's Ravan layers, or whose upload does not match
    it: a compact ``lora_H`` ``[K < h, r, r]`` needs the layer in ``meta["heads"]`` with exactly
    ``K`` heads; ``lora_s``, when sent, has one entry per uploaded head."""
    trained = trained_heads(global_state, meta)
    for path in _paths(global_state):
        H_g = global_state[f"{path}.lora_H"]
        key = f"{path}.lora_H"
        H = state.get(key)
        if H is None:
            continue
        h = H_g.shape[0]
        if H.dim() != H_g.dim() or H.shape[1:] != H_g.shape[1:] or not 1 <= H.shape[0] <= h:
            raise ClientRejected(
                key,
                f"shape {list(H.shape)} is not [K <= {h}, {', '.join(map(str, H_g.shape[1:]))}]",
            )
        K = H.shape[0]
        if K < h:
            if path not in trained:
                raise ClientRejected(
                    key, f"a compact upload of {K} of {h} heads needs meta 'heads' for {path!r}"
                )
            if len(trained[path]) != K:
                raise ClientRejected(
                    key, f"meta 'heads' lists {len(trained[path])} heads, the upload has {K}"
                )
        s = state.get(f"{path}.lora_s")
        if s is not None and list(s.shape) != [K]:
            raise ClientRejected(
                f"{path}.lora_s", f"shape {list(s.shape)} != [{K}] (one per uploaded head)"
            )


_F32_MAX = float(torch.finfo(torch.float32).max)


def _folded(state: Mapping[str, torch.Tensor], path: str, dtype=torch.float32) -> torch.Tensor:
    """``s_i H_i`` of the uploaded heads of one layer as ``[K, r·r]`` (float32, or ``dtype``:
    float64 holds the product of any two finite float32 numbers)."""
    H = state[f"{path}.lora_H"].to(dtype)
    s = state.get(f"{path}.lora_s")
    if s is not None:
        H = H * s.to(dtype)[:, None, None]
    return H.reshape(H.shape[0], -1)


def _head_scales(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    path: str,
    heads_of: Sequence[Mapping[str, list[int]]],
) -> torch.Tensor | None:
    """Per head, the divisor ``t_i`` that keeps ``s·H`` finite in float32, or None when every
    folded core (the global's and each upload's) already is (the common case, computed as
    before). ``t_i = sqrt(c_i)`` for the heads whose largest ``|s·H|`` (float64) ``c_i``
    exceeds the float32 maximum, 1 for the others: ``|s·H| / t_i <= sqrt(c_i) <= 3e38``, and the
    new global stores ``H = mean / t`` with ``s = t`` (the layer computes ``s·H``)."""
    g = _folded(global_state, path, torch.float64)
    top = g.abs().amax(dim=1)
    for cs, trained in zip(client_states, heads_of, strict=True):
        rows = _folded(cs, path, torch.float64).abs().amax(dim=1)
        heads = trained.get(path)
        if rows.shape[0] == top.shape[0]:
            top = torch.maximum(top, rows)
        else:
            top[heads] = torch.maximum(top[heads], rows)
    if not bool((top > _F32_MAX).any()):
        return None
    return torch.where(top > _F32_MAX, top.sqrt(), torch.ones_like(top))


def _placed(
    g: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    path: str,
    heads: list[int] | None,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cores [h, r·r], mask [h])`` of one client and layer: every head's ``s·H`` (a compact
    upload written into zeros at its heads' indices; divided by ``scales`` per head, in float64,
    when given) and which heads it trained."""
    if scales is None:
        rows = _folded(state, path)
    else:
        rows = _folded(state, path, torch.float64)
        t = scales if rows.shape[0] == scales.shape[0] else scales[heads]
        rows = (rows / t[:, None]).float()
    h = g.shape[0]
    mask = torch.ones(h)
    if heads is not None:
        mask.zero_()
        mask[heads] = 1
    if rows.shape[0] == h:
        return rows, mask
    full = torch.zeros_like(g)
    full[heads] = rows.to(full.device)
    return full, mask


def aggregate(
    global_state: dict[str, torch.Tensor],
    client_states: Sequence[dict[str, torch.Tensor]],
    weights: torch.Tensor,
    metas: Sequence[dict[str, Any]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Ravan's server rule (see the module docstring); inputs validated by ``fedlora.aggregate``.

    ``weights`` are the clients' normalised ``p_k``. Returns the new global state and metrics:
    ``aggregation_error`` (relative, measured in core space, which equals ΔW space for the
    default orthonormal bases) and ``heads_trained`` (per layer, how many clients trained each
    head).
    """
    paths = _paths(global_state)
    if not paths:
        raise ValueError("global_state has no '<path>.lora_H' keys: not a Ravan adapter state")
    w = torch.as_tensor(normalised(weights), dtype=torch.float64)
    heads_of = [trained_heads(global_state, meta or {}) for meta in metas]
    new_state: dict[str, torch.Tensor] = {}
    err_num, err_den = 0.0, 0.0
    heads_trained: dict[str, list[int]] = {}
    for path in paths:
        s_key = f"{path}.lora_s"
        # huge finite uploads (s and H up to 3e38): s·H overflows float32, so such heads are
        # averaged divided by t and stored as H = mean / t, s = t (without lora_s in the state,
        # s·H is H itself and never overflows)
        scales = _head_scales(global_state, client_states, path, heads_of)
        if scales is None or s_key not in global_state:
            scales = None
            g = _folded(global_state, path)
        else:
            g = (_folded(global_state, path, torch.float64) / scales[:, None]).float()
        placed = [
            _placed(g, cs, path, trained.get(path), scales)
            for cs, trained in zip(client_states, heads_of, strict=True)
        ]
        clients = [c for c, _ in placed]
        mask = torch.stack([m for _, m in placed])
        new = fk.masked_weighted_mean(clients, w, mask, rank_dim=0, fallback=g)
        H_shape = global_state[f"{path}.lora_H"].shape
        dtype = global_state[f"{path}.lora_H"].dtype
        new_state[f"{path}.lora_H"] = new.reshape(H_shape).to(dtype)
        if s_key in global_state:
            s_new = torch.ones_like(global_state[s_key])
            if scales is not None:
                s_new = scales.to(s_new.dtype).to(s_new.device)
            new_state[s_key] = s_new
        heads_trained[path] = mask.sum(0).int().tolist()
        # ideal: Σ_k p_k ΔW_k with each client's own core (untrained heads hold the global's)
        client_full = torch.stack(
            [torch.where(m[:, None] > 0, c, g) for c, m in zip(clients, mask, strict=True)]
        )
        ideal = torch.einsum("k,kq->q", w, client_full.reshape(len(clients), -1).double())
        # float64: squares of finite float32 cores never overflow
        err_num += float((ideal - new.reshape(-1).double()).square().sum())
        err_den += float(ideal.square().sum())
    rest = [k for k in global_state if k not in new_state and not k.endswith(_SUFFIXES)]
    new_state.update(weighted_average(client_states, w.tolist(), rest, global_state))
    error = (err_num**0.5) / (err_den**0.5) if err_den > 0 else 0.0
    return new_state, {"aggregation_error": error, "heads_trained": heads_trained}


OPTIONS = (
    Option("heads", "int", 4, "Ravan: heads per layer (h)", low=1, high=10**6),
    Option("head_score", "str", "weight", "Ravan: how a client picks its heads", choices=SCORES),
)


def upload_numel(budget: Budget, shape: tuple[int, int], options: ClientOptions) -> int:
    """``K_c · r²``: the trained heads' ``r × r`` cores (the bases never travel)."""
    return budget.heads * options.rank**2


class RavanClient(Client):
    """Ravan client: ``K_c = budget.heads`` heads per layer train, chosen by the run's head
    score (``weight``, the default, and ``random`` when the slot is prepared; ``gradient`` after
    one scoring batch with every head trainable); the upload is ``s·H`` of the trained heads
    with their indices; the layers use ``scale = 1`` whatever ``--rank`` (module docstring)."""

    OPTIONS = OPTIONS

    def layer_options(self) -> dict[str, Any]:
        o = self.options
        # scale 1, not alpha / rank: --rank and --heads must not change the step size (DESIGN §4)
        return {"heads": o.heads, "rank": o.rank, "scale": 1.0}

    def prepare(
        self,
        model: nn.Module,
        slot: int,
        state: Mapping[str, torch.Tensor],
        budget: Budget,
        seed: int,
    ) -> None:
        super().prepare(model, slot, state, budget, seed)  # every head trainable
        score = self.option("head_score")
        if score != "gradient":
            select_heads(model, budget.heads, score, slot=slot, seed=seed)

    def pre_steps(self, budget: Budget) -> int:
        return 1 if self.option("head_score") == "gradient" else 0

    def scoring_done(self, model: nn.Module, slot: int, budget: Budget, seed: int) -> None:
        if self.option("head_score") == "gradient":
            select_heads(model, budget.heads, "gradient", slot=slot, seed=seed)

    def upload(
        self, model: nn.Module, slot: int, budget: Budget
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return client_update(model, slot=slot, modules_to_save=())


METHOD = Method(
    name="ravan",
    layer="ravan",
    ranks="equal",
    aggregate=aggregate,
    client=RavanClient,
    check_client=check_client,
    optional_suffixes=(".lora_s",),
    indexed_suffixes=_SUFFIXES,
    budget_fields=("heads", "steps"),
    summary="Ravan: multi-head LoRA, frozen shared bases, per-head average of trained cores",
    options=OPTIONS,
    # the cores need a larger rate than full LoRA factors: bench/results/lr-tuning-sft.md
    default_lr={"sft": 3e-2},
    upload_numel=upload_numel,
)
