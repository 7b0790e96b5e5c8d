"""HAFL client side: importance scores of rank-1 components and which ones a client trains.

Per element of ``A`` and ``B`` the sensitivity is ``I = |w · ∂L/∂w|``; it is smoothed
``Ī ← β1 Ī + (1−β1) I`` and its uncertainty tracked ``Ū ← β2 Ū + (1−β2) |I − Ī|``
(β1 = β2 = 0.85). The element score is ``Ī·Ū`` (``score="ema"``: ``Ī``), and the score of
component ``j`` (the rank-1 matrix ``B[:, j] A[j, :]``) is
``S_j = mean_p score(B[p, j]) + mean_q score(A[j, q])``.

Freezing mode (the default): every client holds the full rank ``R``; it runs ``score_steps``
batches to fill the averages, then trains only its top-``m_k`` components per module
(:meth:`ImportanceTracker.select`), chosen anew each round; its upload (:func:`client_update`)
carries all components plus, per module, the indices it updated and its component scores.

Truncation mode: the client receives only the top-``r_k`` components by the server's averaged
scores (:func:`truncation_download`), trains them all, and uploads them with their indices
(:func:`truncation_upload`) so the server writes them back in place.

The first update of a fresh tracker sets ``Ī = I`` (no bias toward 0) and ``Ū = 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedlora.layers.lora import LoRALinear
from fedlora.methods.prefix import A_SUFFIX, B_SUFFIX

SCORES = ("ema_unc", "ema")


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(path, layer)`` of every :class:`LoRALinear` of ``model``."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("model has no LoRALinear layers: fedlora.inject(model, 'hafl', ...)")
    return layers


class ImportanceTracker:
    """Smoothed sensitivity and uncertainty of every LoRA element, for all slots at once.

    Call :meth:`update` after each backward pass (it reads ``lora_A.grad`` / ``lora_B.grad``).
    State tensors have the parameters' shapes ``[C, R, d_in]`` / ``[C, d_out, R]``.
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
        self.updates = torch.zeros(self.layers[0][1].num_clients, dtype=torch.long)

    def reset(self, slot: int | None = None) -> None:
        """Forget the averages (of one slot, or all): a new round starts from scratch."""
        if slot is None:
            self.ema.clear()
            self.unc.clear()
            self.updates.zero_()
            return
        for d in (self.ema, self.unc):
            for t in d.values():
                t[slot].zero_()
        self.updates[slot] = 0

    @torch.no_grad()
    def update(self, slots: Sequence[int] | None = None) -> None:
        """Fold the current gradients into the averages of ``slots`` (default: all)."""
        C = self.layers[0][1].num_clients
        chosen = torch.zeros(C, dtype=torch.bool)
        chosen[list(range(C)) if slots is None else list(slots)] = True
        first = (self.updates == 0) & chosen
        for path, layer in self.layers:
            for name, p in (("A", layer.lora_A), ("B", layer.lora_B)):
                if p.grad is None:
                    continue
                key = f"{path}.{name}"
                sens = (p.detach().float() * p.grad.float()).abs()
                ema = self.ema.setdefault(key, torch.zeros_like(sens))
                unc = self.unc.setdefault(key, torch.zeros_like(sens))
                sel = chosen.to(sens.device).view(-1, *[1] * (sens.dim() - 1))
                fresh = first.to(sens.device).view_as(sel)
                new_ema = torch.where(fresh, sens, self.beta1 * ema + (1 - self.beta1) * sens)
                new_unc = torch.where(
                    fresh,
                    torch.zeros_like(unc),
                    self.beta2 * unc + (1 - self.beta2) * (sens - new_ema).abs(),
                )
                ema.copy_(torch.where(sel, new_ema, ema))
                unc.copy_(torch.where(sel, new_unc, unc))
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

    def select(self, budget: int, slot: int = 0) -> dict[str, list[int]]:
        """Make only the top-``budget`` components of each module trainable in ``slot``.

        Ties are broken by the lower index. Returns ``{path: sorted indices}``.
        """
        R = self.layers[0][1].rank
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= R:
            raise ValueError(f"budget must be an int in [1, {R}] (the rank), got {budget!r}")
        chosen = {}
        for path, scores in self.component_scores(slot).items():
            order = torch.sort(-scores, stable=True).indices
            idx = sorted(order[:budget].tolist())
            dict(self.layers)[path].set_trainable(idx, slot)
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


def truncation_download(
    global_state: dict[str, torch.Tensor], global_scores: dict[str, Sequence[float]], rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Truncation mode: the top-``rank`` components of every module by the server's averaged
    scores, as a rank-``rank`` state dict, and the indices they came from."""
    state, indices = dict(global_state), {}
    for key in global_state:
        if not key.endswith(A_SUFFIX):
            continue
        path = key[: -len(A_SUFFIX)]
        scores = torch.as_tensor(global_scores[path], dtype=torch.float32)
        idx = sorted(torch.sort(-scores, stable=True).indices[:rank].tolist())
        state[path + A_SUFFIX] = global_state[path + A_SUFFIX][idx].clone()
        state[path + B_SUFFIX] = global_state[path + B_SUFFIX][:, idx].clone()
        indices[path] = idx
    return state, indices


def truncation_upload(
    state: dict[str, torch.Tensor], indices: dict[str, list[int]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Truncation mode upload: the trained rank-``r_k`` state and where its components belong."""
    return dict(state), {"indices": {p: list(v) for p, v in indices.items()}}
