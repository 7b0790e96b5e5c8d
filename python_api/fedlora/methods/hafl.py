"""HAFL: importance-aware rank-1 updates; adaptive rank-1 aggregation on the server.

Client side (see DESIGN §4): element importance ``|w·∂L/∂w|`` smoothed with uncertainty, component
score ``S_j``; in freezing mode (default) a client holds the full rank ``R`` and trains only its
top ``m_k`` components; in truncation mode it holds ``r_k < R`` components chosen by the server's
averaged scores (:func:`truncation_download` / :func:`truncation_upload`).

Server (adaptive rank-1 aggregation): per component ``j`` of every layer, the ``p_k``-weighted
mean over the clients that updated ``j``; unchanged if none did; a lone contributor is taken whole
(zero-padding would shrink it by ``Σ_{k updated j} p_k``). Truncation-mode uploads are written
back to their global indices. One :func:`fedlora_kernels.masked_weighted_mean` per factor, with
the participation as the mask. Other keys are ``p_k``-averaged over all accepted clients.

``metas[k]`` (all optional, per layer ``path``):

- ``"updated": {path: [j, ...]}``: global indices of the components the client trained
  (default: every component it holds);
- ``"indices": {path: [j_0, ..., j_{r_k-1}]}``: the global index of each uploaded row of ``A``
  (column of ``B``); required when the client holds fewer than ``R`` components (truncation
  mode), default ``0..R-1``;
- ``"scores": {path: [r_k] tensor or list}``: the client's component scores, aligned with its rows; the
  server averages them per component over the reporting clients and returns them in
  ``metrics["scores"]`` (components nobody reported keep ``prev_scores`` if given, else 0).

``aggregation="zeropad"`` (the option ``--hafl-aggregation zeropad``, the paper's contrast): the
same uploads zero-padded instead, ``Σ_{k updated j} p_k X_k[j]`` (a component nobody updated
becomes 0), so adaptive vs zero-padding can be compared with the same client side.

Streaming-capable.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedlora.layers.lora import LoRALinear
from fedlora.methods._common import (
    A_SUFFIX,
    B_SUFFIX,
    ClientRejected,
    MaskedAccumulator,
    State,
    a_key,
    average_other_keys,
    b_key,
    index_list,
    lora_paths,
    masked_mean,
    other_keys,
    per_layer,
    rank_of,
)
from fedlora.methods._protocol import Budget, Client, ClientOptions, Method, Option


def _per_layer(meta: Mapping[str, Any], name: str, key: str) -> Mapping[str, Any]:
    value = meta.get(name, {})
    if not isinstance(value, Mapping):
        raise ClientRejected(key, f"meta {name!r} must be a {{path: ...}} dict")
    return value


def layout(
    global_state: State, state: State, meta: Mapping[str, Any], path: str
) -> tuple[list[int], list[int]]:
    """``(indices, updated)`` of one client and layer, validated: the global index of each
    uploaded component, and the global indices the client trained."""
    key = b_key(path)
    full = rank_of(global_state, path)
    held = rank_of(state, path)
    indices_meta = _per_layer(meta, "indices", key)
    if path in indices_meta:
        indices = index_list(indices_meta[path], "indices", key, full)
        if len(indices) != held:
            raise ClientRejected(
                key, f"meta 'indices' lists {len(indices)} components, the upload has rank {held}"
            )
    elif held == full:
        indices = list(range(full))
    else:
        raise ClientRejected(
            key, f"rank {held} < global rank {full} needs meta 'indices' (truncation mode)"
        )
    updated_meta = _per_layer(meta, "updated", key)
    if path in updated_meta:
        updated = index_list(updated_meta[path], "updated", key, full)
        missing = sorted(set(updated) - set(indices))
        if missing:
            raise ClientRejected(key, f"meta 'updated' names components {missing} not uploaded")
    else:
        updated = indices
    scores_of(meta, path, held)
    return indices, updated


def scores_of(meta: Mapping[str, Any], path: str, held: int) -> torch.Tensor | None:
    """The client's component scores of one layer as float32 ``[held]`` (from a tensor or a list
    of numbers), validated; None if it reports none."""
    key = b_key(path)
    scores = _per_layer(meta, "scores", key).get(path)
    if scores is None:
        return None
    try:
        scores = torch.as_tensor(scores, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ClientRejected(key, "meta 'scores' must be a tensor or a list of numbers") from None
    if list(scores.shape) != [held]:
        raise ClientRejected(
            key, f"meta 'scores' must have shape [{held}], got {list(scores.shape)}"
        )
    if not bool(torch.isfinite(scores).all()):
        raise ClientRejected(key, "meta 'scores' contains NaN/inf")
    return scores


def check_client(global_state: State, state: State, meta: Mapping[str, Any]) -> None:
    """Validate the per-layer indices, updated components and scores of a client's meta."""
    paths = lora_paths(global_state)
    for name in ("indices", "updated", "scores"):
        per_layer(meta, name, paths)
    for path in paths:
        layout(global_state, state, meta, path)


def _placed(
    global_state: State, state: State, path: str, indices: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's ``(A, B)`` at their global indices: as uploaded when they are ``0..R-1``, else
    written into zero ``[R, d_in]`` / ``[d_out, R]`` buffers (truncation mode only)."""
    A, B = state[a_key(path)], state[b_key(path)]
    full = rank_of(global_state, path)
    if indices == list(range(full)):
        return A, B
    A_full = A.new_zeros((full, A.shape[1]))
    B_full = B.new_zeros((B.shape[0], full))
    A_full[indices] = A
    B_full[:, indices] = B
    return A_full, B_full


def error_state(global_state: State, state: State, meta: Mapping[str, Any]) -> State:
    """The client's whole adapter, for the aggregation error: the components it uploaded at
    their global indices, the global's components everywhere else (what the client holds)."""
    out = dict(state)
    for path in lora_paths(global_state):
        indices, _ = layout(global_state, state, meta, path)
        A = global_state[a_key(path)].clone()
        B = global_state[b_key(path)].clone()
        A[indices] = state[a_key(path)].to(A.dtype)
        B[:, indices] = state[b_key(path)].to(B.dtype)
        out[a_key(path)], out[b_key(path)] = A, B
    return out


def _mask(full: int, updated: list[int], device: torch.device) -> torch.Tensor:
    m = torch.zeros(full, dtype=torch.float32, device=device)
    m[updated] = 1.0
    return m


def aggregate(
    global_state: State,
    client_states: Sequence[State],
    weights: Sequence[float],
    metas: Sequence[Mapping[str, Any]],
    *,
    prev_scores: Mapping[str, torch.Tensor] | None = None,
    aggregation: str = "adaptive",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HAFL's adaptive rank-1 aggregation (or, ``aggregation="zeropad"``, the zero-padded
    contrast); see the module docstring."""
    _check_aggregation(aggregation)
    new_state: dict[str, torch.Tensor] = {}
    updates: dict[str, list[int]] = {}
    scores_out: dict[str, torch.Tensor] = {}
    for path in lora_paths(global_state):
        A_g = global_state[a_key(path)]
        full = A_g.shape[0]
        As, Bs, masks, score_list, score_masks, score_w = [], [], [], [], [], []
        for cs, meta, w in zip(client_states, metas, weights, strict=True):
            indices, updated = layout(global_state, cs, meta, path)
            A, B = _placed(global_state, cs, path, indices)
            As.append(A)
            Bs.append(B)
            masks.append(_mask(full, updated, A_g.device))
            s = scores_of(meta, path, len(indices))
            if s is not None:
                placed = torch.zeros(full, dtype=torch.float32, device=A_g.device)
                placed[indices] = s.to(device=A_g.device, dtype=torch.float32)
                score_list.append(placed)
                score_masks.append(_mask(full, indices, A_g.device))
                score_w.append(w)
        mask = torch.stack(masks)
        if aggregation == "adaptive":
            new_state[a_key(path)] = masked_mean(As, weights, mask, rank_dim=0, fallback=A_g)
            new_state[b_key(path)] = masked_mean(
                Bs, weights, mask, rank_dim=1, fallback=global_state[b_key(path)]
            )
        else:
            w = torch.tensor(weights, dtype=torch.float32, device=mask.device)
            share = (mask.float() * w[:, None]).sum(0) / float(sum(weights))
            for key, Xs, dim in ((a_key(path), As, 0), (b_key(path), Bs, 1)):
                g = global_state[key]
                mean = masked_mean(Xs, weights, mask, rank_dim=dim, fallback=torch.zeros_like(g))
                view = [1, 1]
                view[dim] = -1
                new_state[key] = (mean.float() * share.view(view)).to(g.dtype)
        updates[path] = mask.sum(0).int().tolist()
        prev = (prev_scores or {}).get(path)
        if score_list or prev is not None:
            fb = (
                prev.to(device=A_g.device, dtype=torch.float32)
                if prev is not None
                else torch.zeros(full, dtype=torch.float32, device=A_g.device)
            )
            if score_list:
                scores_out[path] = masked_mean(
                    score_list, score_w, torch.stack(score_masks), rank_dim=0, fallback=fb
                )
            else:
                scores_out[path] = fb.clone()
    average_other_keys(new_state, global_state, client_states, weights)
    extra: dict[str, Any] = {"hafl_updates": updates}
    if scores_out:
        extra["scores"] = scores_out
    return {k: new_state[k] for k in global_state}, extra


def stream_add(
    acc: MaskedAccumulator,
    state: State,
    weight: float,
    meta: Mapping[str, Any],
    *,
    prev_scores: Mapping[str, torch.Tensor] | None = None,
    aggregation: str = "adaptive",
) -> None:
    """Add one client's updated components (at their global indices) to the running sums."""
    _check_aggregation(aggregation)
    g = acc.global_state
    for path in lora_paths(g):
        indices, updated = layout(g, state, meta, path)
        A, B = _placed(g, state, path, indices)
        mask = _mask(rank_of(g, path), updated, A.device)
        acc.add(a_key(path), A, weight, rank_dim=0, mask=mask)
        acc.add(b_key(path), B, weight, rank_dim=1, mask=mask)
        acc.add(path + "#count", mask, 1.0, mask=mask, like=mask)  # den = clients per component
        s = scores_of(meta, path, len(indices))
        if s is not None:
            full = rank_of(g, path)
            placed = torch.zeros(full, dtype=torch.float32, device=A.device)
            placed[indices] = s.to(device=A.device, dtype=torch.float32)
            acc.add(
                path + "#scores", placed, weight, mask=_mask(full, indices, A.device), like=placed
            )
    acc.add_full(other_keys(g), state, weight)


def stream_result(
    acc: MaskedAccumulator,
    *,
    prev_scores: Mapping[str, torch.Tensor] | None = None,
    aggregation: str = "adaptive",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per component means over the clients that updated it; the rest unchanged (zero-padded
    sums with ``aggregation="zeropad"``)."""
    g = acc.global_state
    out: dict[str, torch.Tensor] = {}
    updates: dict[str, list[int]] = {}
    scores_out: dict[str, torch.Tensor] = {}
    for path in lora_paths(g):
        for key, dim in ((a_key(path), 0), (b_key(path), 1)):
            if aggregation == "zeropad":
                out[key] = acc.zero_padded(key, rank_dim=dim).to(g[key].dtype)
            else:
                out[key] = acc.mean(key, rank_dim=dim)
        full = rank_of(g, path)
        count = acc.den.get(path + "#count")
        updates[path] = [0] * full if count is None else count.round().int().tolist()
        prev = (prev_scores or {}).get(path)
        key = path + "#scores"
        fb = (
            prev.float()
            if prev is not None
            else torch.zeros(full, dtype=torch.float32, device=g[a_key(path)].device)
        )
        if key in acc.avg:
            scores_out[path] = torch.where(acc.den[key] > 0, acc.avg[key].float(), fb)
        elif prev is not None:
            scores_out[path] = fb.clone()
    for key in other_keys(g):
        out[key] = acc.mean(key)
    extra: dict[str, Any] = {"hafl_updates": updates}
    if scores_out:
        extra["scores"] = scores_out
    return {k: out[k] for k in g}, extra


# ------------------------------------------------------------------------------------------------
# client side
# ------------------------------------------------------------------------------------------------
# HAFL client side: importance scores of rank-1 components and which ones a client trains.
#
# Per element of ``A`` and ``B`` the sensitivity is ``I = |w · ∂L/∂w|``; it is smoothed
# ``Ī ← β1 Ī + (1−β1) I`` and its uncertainty tracked ``Ū ← β2 Ū + (1−β2) |I − Ī|``
# (β1 = β2 = 0.85). The element score is ``Ī·Ū`` (``score="ema"``: ``Ī``), and the score of
# component ``j`` (the rank-1 matrix ``B[:, j] A[j, :]``) is
# ``S_j = mean_p score(B[p, j]) + mean_q score(A[j, q])``.
#
# Three choices the paper leaves open (DESIGN §4), made here:
#
# 1. The first update of an element sets ``Ī = I`` AND ``Ū = I`` (not ``Ū = 0``). With ``Ū = 0``
#    one scoring step (the default ``--hafl-score-steps 1``) scores every element ``Ī·0 = 0``, so
#    ties fall to the lowest index and every client trains components ``0..m_k−1`` whatever its
#    data. A single reading says nothing about its variability, so its uncertainty is taken as
#    its own size: after one step the element score is ``I²``, a ranking by importance, and the
#    score keeps ONE definition at every step (no switch from ``Ī`` to ``Ī·Ū`` mid-round). It is
#    also what AdaLoRA's zero-initialised averages give after one step, up to their bias
#    correction constants (``Ī = (1−β1) I``, ``Ū = (1−β2) β1 I``); the prior's weight then decays
#    as ``β2^t``.
# 2. Components a slot does not train (frozen by :meth:`ImportanceTracker.select`, or outside the
#    slot's rank in truncation mode) get exactly zero gradient; they are NOT re-scored from it:
#    their averages are left as they were when they were last trained or scored (per slot, per
#    component). Otherwise after a few steps a frozen component's ``Ī`` decays toward 0 while its
#    ``Ū`` grows with ``|0 − Ī|``, and the uploaded scores compare stale numbers with live ones.
# 3. Round 1, ``B = 0`` (the LoRA initialisation): ``∂L/∂A = scale·Bᵀ(∂L/∂y)x = 0`` and every
#    ``B`` element is 0, so ``|w·g| = 0`` EVERYWHERE: the sensitivity carries no information at
#    all (it is the loss change from removing a weight, and removing a zero weight changes
#    nothing). When a slot's first update of a layer finds every sensitivity of that layer
#    exactly 0, the slot scores that layer by the gradient magnitude ``|g|`` instead, for the rest
#    of the round (sticky, so one round's scores have one unit). In round 1 that is
#    ``mean_p |∂L/∂B[p, j]|``: how strongly the client's loss pulls on the output of component
#    ``j`` through its (random, Kaiming) input direction ``A[j]`` — the components whose first
#    Adam steps reduce the client's loss most. It depends on the client's data, so non-IID
#    clients choose different components. From round 2 the trained components have ``B ≠ 0`` and
#    ``|w·g|`` is used again; a component nobody has trained still has ``B = 0`` and scores 0
#    there, so it is chosen only by a client whose budget exceeds the trained ones (the paper's
#    sensitivity has this property). Exact ties (no scoring step at all, or a layer whose
#    gradient is 0 too) are broken by a seeded random order (the client's seed), not the index.
#
# Freezing mode (the default, ``hafl_mode="freeze"``): every client holds the full rank ``R``; it
# runs ``score_steps`` batches to fill the averages, then trains only its top-``m_k``
# components per module (:meth:`ImportanceTracker.select`, ``m_k = budget.components``), chosen
# anew each round; its upload (:func:`client_update`) carries the trained components, their
# indices and their scores.
#
# Truncation mode (``hafl_mode="truncate"``): client ``k`` receives only the top-``r_k``
# components by the server's averaged scores (:func:`truncation_download`, ``r_k =
# budget.rank``), trains them all, and uploads them with their indices and scores
# (:func:`truncation_upload`) so the server writes them back in place. The client side learns
# the server's scores through :meth:`HAFLClient.after_aggregate` and hands them back as the
# rule's ``prev_scores`` option (components nobody reported keep their last score). Before any
# scores exist (round 1) the top-``r_k`` by zero scores are the prefix ``0..r_k−1``: round 1 of
# truncation is HetLoRA's first round (every component is at its initialisation then, so which
# ones a client gets does not matter yet).

SCORES = ("ema_unc", "ema")
MODES = ("freeze", "truncate")
AGGREGATIONS = ("adaptive", "zeropad")
#: the ``--hafl-score`` names of the element scores: ``Ī·Ū`` (the paper's) or ``Ī`` alone
SCORE_NAMES = {"sensitivity_uncertainty": "ema_unc", "sensitivity": "ema"}

OPTIONS = (
    Option("hafl_mode", "str", "freeze", "HAFL: freeze (hold rank R, train the top budget "
           "components) or truncate (hold the top budget rank components by the server's "
           "scores)", choices=MODES),
    Option("hafl_score_steps", "int", 1, "HAFL: batches that only score importance (freeze "
           "mode)", low=0, high=10**6),
    Option("hafl_score", "str", "sensitivity_uncertainty", "HAFL: element score, smoothed "
           "sensitivity times its uncertainty (the paper) or the sensitivity alone",
           choices=tuple(SCORE_NAMES)),
    Option("hafl_aggregation", "str", "adaptive", "HAFL: per-component average over the "
           "clients that updated it (adaptive) or the zero-padded contrast",
           choices=AGGREGATIONS, server="aggregation"),
)  # fmt: skip


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def check_options(values: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Refuse scoring steps in truncation mode (it runs none: the server chose the
    components)."""
    if values["hafl_mode"] == "truncate" and given.get("hafl_score_steps", 0):
        raise ValueError(
            "--hafl-score-steps: --hafl-mode truncate runs no scoring steps (the server's "
            "scores choose the components); leave it out"
        )


def upload_numel(budget: Budget, shape: tuple[int, int], options: ClientOptions) -> int:
    """The trained components (freeze: ``budget.components``; truncate: ``budget.rank``),
    each a row of ``A`` and a column of ``B``."""
    mode = dict(options.method_options).get("hafl_mode", options.hafl_mode)
    m = budget.components if mode == "freeze" else budget.rank
    return m * sum(shape)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(path, layer)`` of every :class:`LoRALinear` of ``model``."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("model has no LoRALinear layers: fedlora.inject(model, 'hafl', ...)")
    return layers


def _ranked(scores: torch.Tensor, seed: int | None, salt: str) -> torch.Tensor:
    """Indices by descending score; ties by the lower index (``seed`` None) or in a seeded
    random order."""
    if seed is None:
        return torch.sort(-scores, stable=True).indices
    gen = torch.Generator().manual_seed((int(seed) * 7919 + zlib.crc32(salt.encode())) % 2**31)
    order = torch.randperm(scores.numel(), generator=gen)
    return order[torch.sort(-scores[order], stable=True).indices]


class ImportanceTracker:
    """Smoothed sensitivity and uncertainty of every LoRA element, for all slots at once.

    Call :meth:`update` after each backward pass (it reads ``lora_A.grad`` / ``lora_B.grad``).
    State tensors have the parameters' shapes ``[C, R, d_in]`` / ``[C, d_out, R]``. Only the
    components a slot trains (``grad_mask`` and ``rank_mask`` of the layer) are updated; see the
    comment above for the first update (``Ū = I``) and the zero-sensitivity fallback to ``|g|``.
    """

    def __init__(
        self, model: nn.Module, *, beta1: float = 0.85, beta2: float = 0.85, score: str = "ema_unc"
    ) -> None:
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {b}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.layers = lora_layers(model)
        self.beta1, self.beta2, self.score = beta1, beta2, score
        self.ema: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}
        #: per layer ``[C, R]``: how many updates each component of each slot has taken
        self.count: dict[str, torch.Tensor] = {}
        #: per layer ``[C]``: the slot scores this layer by ``|g|`` this round (``|w·g|`` was 0)
        self.by_gradient: dict[str, torch.Tensor] = {}
        self._decided: dict[str, torch.Tensor] = {}
        self.updates = torch.zeros(self.layers[0][1].num_clients, dtype=torch.long)

    def reset(self, slot: int | None = None) -> None:
        """Forget the averages (of one slot, or all): a new round starts from scratch."""
        if slot is None:
            for d in (self.ema, self.unc, self.count, self.by_gradient, self._decided):
                d.clear()
            self.updates.zero_()
            return
        for d in (self.ema, self.unc, self.count, self.by_gradient, self._decided):
            for t in d.values():
                t[slot].zero_()
        self.updates[slot] = 0

    @torch.no_grad()
    def update(self, slots: Sequence[int] | None = None) -> None:
        """Fold the current gradients into the averages of ``slots`` (default: all), for the
        components each slot trains."""
        C = self.layers[0][1].num_clients
        chosen = torch.zeros(C, dtype=torch.bool)
        chosen[list(range(C)) if slots is None else list(slots)] = True
        for path, layer in self.layers:
            gA, gB = layer.lora_A.grad, layer.lora_B.grad
            if gA is None and gB is None:
                continue
            A, B = layer.lora_A.detach().float(), layer.lora_B.detach().float()
            gA = torch.zeros_like(A) if gA is None else gA.detach().float()
            gB = torch.zeros_like(B) if gB is None else gB.detach().float()
            dev = A.device
            active = chosen.to(dev)[:, None] & layer.grad_mask.bool() & layer.rank_mask.bool()
            act_A, act_B = active[:, :, None], active[:, None, :]
            sens_A, sens_B = (A * gA).abs(), (B * gB).abs()
            count = self.count.setdefault(
                path, torch.zeros(C, layer.rank, dtype=torch.long, device=dev)
            )
            by_grad = self.by_gradient.setdefault(
                path, torch.zeros(C, dtype=torch.bool, device=dev)
            )
            decided = self._decided.setdefault(path, torch.zeros(C, dtype=torch.bool, device=dev))
            deciding = active.any(1) & ~decided
            if bool(deciding.any()):  # the slot's first update of this layer this round
                silent = ((sens_A * act_A).flatten(1).amax(1) == 0) & (
                    (sens_B * act_B).flatten(1).amax(1) == 0
                )
                by_grad.copy_(torch.where(deciding, silent, by_grad))
                decided |= deciding
            g_mode = by_grad.view(-1, 1, 1)
            fresh = active & (count == 0)
            for name, sens, grad, act, fr in (
                ("A", sens_A, gA, act_A, fresh[:, :, None]),
                ("B", sens_B, gB, act_B, fresh[:, None, :]),
            ):
                key = f"{path}.{name}"
                I = torch.where(g_mode, grad.abs(), sens)
                ema = self.ema.setdefault(key, torch.zeros_like(I))
                unc = self.unc.setdefault(key, torch.zeros_like(I))
                new_ema = torch.where(fr, I, self.beta1 * ema + (1 - self.beta1) * I)
                new_unc = torch.where(
                    fr, I, self.beta2 * unc + (1 - self.beta2) * (I - new_ema).abs()
                )
                ema.copy_(torch.where(act, new_ema, ema))
                unc.copy_(torch.where(act, new_unc, unc))
            count += active.long()
        self.updates += chosen.long()

    def component_scores(self, slot: int = 0) -> dict[str, torch.Tensor]:
        """``{path: S [R]}``: per-component importance of ``slot`` (zeros before any update)."""
        out = {}
        for path, layer in self.layers:
            parts = []
            for name, dim in (("A", 1), ("B", 0)):
                key = f"{path}.{name}"
                if key not in self.ema:
                    parts.append(torch.zeros(layer.rank))
                    continue
                e = self.ema[key][slot]
                s = e * self.unc[key][slot] if self.score == "ema_unc" else e
                parts.append(s.mean(dim=dim).cpu())
            out[path] = parts[0] + parts[1]
        return out

    def select(
        self, budget: int, slot: int = 0, *, seed: int | None = None
    ) -> dict[str, list[int]]:
        """Make only the top-``budget`` components of each module trainable in ``slot``.

        Ties are broken by the lower index, or with ``seed`` in a seeded random order (per
        module). Returns ``{path: sorted indices}``.
        """
        R = self.layers[0][1].rank
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= R:
            raise ValueError(f"budget must be an int in [1, {R}] (the rank), got {budget!r}")
        chosen = {}
        layers = dict(self.layers)
        for path, scores in self.component_scores(slot).items():
            idx = sorted(_ranked(scores, seed, path)[:budget].tolist())
            layers[path].set_trainable(idx, slot)
            chosen[path] = idx
        return chosen


def client_update(
    model: nn.Module,
    selection: dict[str, list[int]],
    scores: dict[str, torch.Tensor],
    *,
    slot: int = 0,
    modules_to_save: Sequence[str] = (),
    compact: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Upload in freezing mode: ``(state, meta)``.

    With ``compact`` (default) only the updated components travel: per module the rows of ``A``
    and columns of ``B`` in ``selection[path]``, with ``meta["indices"]`` saying where they
    belong, so a client that trained ``m_k`` of ``R`` components sends ``m_k/R`` of the factor
    bytes. ``compact=False`` sends every component. ``meta["updated"]`` lists the trained
    components and ``meta["scores"]`` the component scores aligned with the uploaded rows.
    """
    from fedlora.state_dict import get_adapter_state_dict

    state = get_adapter_state_dict(model, slot=slot, modules_to_save=modules_to_save)
    meta: dict[str, Any] = {"updated": {p: list(v) for p, v in selection.items()}}
    if not compact:
        meta["scores"] = {p: s.float().tolist() for p, s in scores.items()}
        return state, meta
    meta["indices"] = meta["updated"]
    meta["scores"] = {}
    for path, idx in selection.items():
        state[path + A_SUFFIX] = state[path + A_SUFFIX][idx].clone()
        state[path + B_SUFFIX] = state[path + B_SUFFIX][:, idx].clone()
        meta["scores"][path] = scores[path].float()[idx].tolist()
    return state, meta


def top_components(scores: Any, full: int, rank: int) -> list[int]:
    """Sorted indices of the ``rank`` highest of ``scores`` (``[full]``; None: all zero, i.e.
    the prefix ``0..rank−1``); ties by the lower index, so the server and every client agree."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(f"rank must be an int in [1, {full}] (the global rank), got {rank!r}")
    if scores is None:
        return list(range(rank))
    s = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if s.numel() != full:
        raise ValueError(f"scores must have {full} entries (the global rank), got {s.numel()}")
    return sorted(_ranked(s, None, "")[:rank].tolist())


def truncation_download(
    global_state: dict[str, torch.Tensor],
    global_scores: Mapping[str, Sequence[float]] | None,
    rank: int,
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Truncation mode: the top-``rank`` components of every module by the server's averaged
    scores (a module without scores, or ``global_scores=None``: the prefix), as a
    rank-``rank`` state dict, and the indices they came from."""
    state, indices = dict(global_state), {}
    for key in global_state:
        if not key.endswith(A_SUFFIX):
            continue
        path = key[: -len(A_SUFFIX)]
        full = global_state[key].shape[0]
        idx = top_components((global_scores or {}).get(path), full, rank)
        state[path + A_SUFFIX] = global_state[path + A_SUFFIX][idx].clone()
        state[path + B_SUFFIX] = global_state[path + B_SUFFIX][:, idx].clone()
        indices[path] = idx
    return state, indices


def truncation_upload(
    state: dict[str, torch.Tensor],
    indices: dict[str, list[int]],
    scores: Mapping[str, Sequence[float]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Truncation mode upload: the trained rank-``r_k`` state, where its components belong and
    (optionally) their scores, aligned with the uploaded rows."""
    meta: dict[str, Any] = {"indices": {p: list(v) for p, v in indices.items()}}
    if scores is not None:
        meta["scores"] = {p: [float(x) for x in v] for p, v in scores.items()}
    return dict(state), meta


class HAFLClient(Client):
    """HAFL's client side, in the run's ``hafl_mode``.

    ``"freeze"`` (default): score ``hafl_score_steps`` batches, then train the top-``m_k``
    components of every layer (``budget.components``); upload the trained components with their
    indices and scores. ``"truncate"``: download the top-``r_k`` components by the server's
    averaged scores (``budget.rank``), train them all, upload them with their indices and
    scores. The server's scores arrive through :meth:`after_aggregate` (the simulator calls it
    after every round; a caller that never calls it gets prefixes, i.e. round-1 behaviour).
    """

    OPTIONS = OPTIONS

    def __init__(self, options: ClientOptions, budgets: Sequence[Budget]) -> None:
        super().__init__(options, budgets)
        mode = self.option("hafl_mode")
        if mode not in MODES:
            raise ValueError(f"hafl_mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        #: the server's last averaged component scores ``{path: [R]}`` (None before round 1)
        self.server_scores: dict[str, torch.Tensor] | None = None

    def setup(self, model: nn.Module) -> None:
        self.tracker = ImportanceTracker(model, score=SCORE_NAMES[self.option("hafl_score")])
        self.selection: dict[int, dict[str, list[int]]] = {}

    def start_round(self, model: nn.Module, round_idx: int) -> None:
        self.tracker.reset()
        self.selection = {}

    def download(self, global_state: State, budget: Budget) -> dict[str, torch.Tensor]:
        if self.mode == "freeze":
            return dict(global_state)
        return truncation_download(dict(global_state), self.server_scores, budget.rank)[0]

    def pre_steps(self, budget: Budget) -> int:
        # truncation: the server chose the components; scores come from the training steps
        return self.option("hafl_score_steps") if self.mode == "freeze" else 0

    def after_backward(self, model: nn.Module, slots: list[int]) -> None:
        self.tracker.update(slots)

    def scoring_done(self, model: nn.Module, slot: int, budget: Budget, seed: int) -> None:
        if self.mode == "freeze":
            self.selection[slot] = self.tracker.select(budget.components, slot, seed=seed)

    def upload(
        self, model: nn.Module, slot: int, budget: Budget
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        scores = self.tracker.component_scores(slot)
        if self.mode == "freeze":
            return client_update(model, self.selection[slot], scores, slot=slot)
        from fedlora.methods.prefix import truncate
        from fedlora.state_dict import get_adapter_state_dict

        r = budget.rank
        state = truncate(get_adapter_state_dict(model, slot=slot), r)
        indices = {
            path: top_components((self.server_scores or {}).get(path), layer.rank, r)
            for path, layer in lora_layers(model)
        }
        return truncation_upload(state, indices, {p: s[:r].tolist() for p, s in scores.items()})

    def handback(self) -> dict[str, Any] | None:
        """Truncation mode: the server's averaged scores (a fresh client side needs them to
        place its downloaded components); freeze mode: nothing."""
        if self.mode != "truncate" or not self.server_scores:
            return None
        return {
            "scores": {p: [float(x) for x in v.tolist()] for p, v in self.server_scores.items()}
        }

    def after_aggregate(self, metrics: Mapping[str, Any]) -> dict[str, Any] | None:
        """Keep the server's averaged scores (``metrics["scores"]``, tensors or lists) for the
        next downloads, and return them as the next round's ``prev_scores``."""
        scores = metrics.get("scores")
        if isinstance(scores, Mapping) and scores:
            self.server_scores = {
                p: torch.as_tensor(v, dtype=torch.float32).reshape(-1).clone()
                for p, v in scores.items()
            }
        return {"prev_scores": self.server_scores} if self.server_scores else None


METHOD = Method(
    name="hafl",
    layer="lora",
    ranks="indexed",
    aggregate=aggregate,
    client=HAFLClient,
    check_client=check_client,
    stream_add=stream_add,
    stream_result=stream_result,
    error_state=error_state,
    budget_fields=("components", "rank", "steps"),
    summary="HAFL: train the most important rank-1 components, per-component average",
    options=OPTIONS,
    check_options=check_options,
    upload_numel=upload_numel,
)
