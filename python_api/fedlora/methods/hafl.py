"""HAFL: importance-aware rank-1 updates; adaptive rank-1 aggregation on the server.

Client side (see DESIGN §4): element importance ``|w·∂L/∂w|`` smoothed with uncertainty, component
score ``S_j``; in freezing mode (default) a client holds the full rank ``R`` and trains only its
top ``m_k`` components; in truncation mode it holds ``r_k < R`` components chosen by the server's
averaged scores (:mod:`fedlora.methods.hafl_client`: ``truncation_download`` /
``truncation_upload``).

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

Streaming-capable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.methods._common import (
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

RANKS = "indexed"


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
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HAFL's adaptive rank-1 aggregation; see the module docstring."""
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
        new_state[a_key(path)] = masked_mean(As, weights, mask, rank_dim=0, fallback=A_g)
        new_state[b_key(path)] = masked_mean(
            Bs, weights, mask, rank_dim=1, fallback=global_state[b_key(path)]
        )
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
) -> None:
    """Add one client's updated components (at their global indices) to the running sums."""
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
    acc: MaskedAccumulator, *, prev_scores: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per component means over the clients that updated it; the rest unchanged."""
    g = acc.global_state
    out: dict[str, torch.Tensor] = {}
    updates: dict[str, list[int]] = {}
    scores_out: dict[str, torch.Tensor] = {}
    for path in lora_paths(g):
        out[a_key(path)] = acc.mean(a_key(path), rank_dim=0)
        out[b_key(path)] = acc.mean(b_key(path), rank_dim=1)
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
