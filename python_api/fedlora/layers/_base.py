"""What every adapter layer shares: wrapping a frozen base layer, merging, batched segments."""

from __future__ import annotations

import torch
from torch import nn


def _is_conv1d(layer: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style: weight stored ``[d_in, d_out]``)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and hasattr(layer, "weight")


def base_features(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or transformers ``Conv1D``; TypeError otherwise."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if _is_conv1d(layer):
        d_in, d_out = layer.weight.shape
        return int(d_in), int(d_out)
    raise TypeError(
        f"base must be an nn.Linear or a transformers Conv1D, got {type(layer).__name__}"
    )


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1 (not a bool); ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_slot(slot: object, num_clients: int) -> int:
    """``slot`` if it indexes one of ``num_clients`` slots; ``ValueError`` otherwise."""
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < num_clients:
        raise ValueError(f"slot must be an int in [0, {num_clients}), got {slot!r}")
    return slot


def scale_offsets(offsets: torch.Tensor | None, items: int, x: torch.Tensor) -> torch.Tensor | None:
    """Offsets over ``items`` leading items turned into offsets over the rows of ``x``."""
    if offsets is None:
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if items == 0 or rows % items:
        raise ValueError(
            f"seg_offsets cover {items} items but the input has {rows} rows ({list(x.shape)}); "
            "the rows must be a whole number of items"
        )
    return offsets * (rows // items) if rows != items else offsets


class AdapterLayer(nn.Module):
    """A frozen base linear layer plus a low-rank adapter with ``num_clients`` slots.

    Subclasses provide :meth:`adapter_output` and :meth:`delta_weight`. The base layer's
    parameters are frozen. Batched simulation sets per-call segments with :meth:`set_segments`
    (rows ``seg_offsets[t]:seg_offsets[t+1]`` of the flattened input use slot ``seg_adapter[t]``).
    """

    def __init__(self, base: nn.Module, num_clients: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = base_features(base)
        check_positive_int("num_clients", num_clients)
        self.base_layer = base
        self.fan_in_fan_out = _is_conv1d(base)
        self.num_clients = num_clients
        for p in base.parameters():
            p.requires_grad_(False)
        self.merged = False
        self.seg_offsets: torch.Tensor | None = None
        self.seg_adapter: torch.Tensor | None = None
        self._seg_items = 0

    # ---------------------------------------------------------------- batched segments
    def set_segments(
        self, seg_offsets: torch.Tensor | None, seg_adapter: torch.Tensor | None = None
    ) -> None:
        """Route the next calls' inputs to adapter slots (``None`` clears: everything slot 0).

        ``seg_offsets`` count items of the input's leading dimension (sequences of a
        ``[batch, seq, d]`` input, rows of a ``[N, d]`` one): segment ``t`` is items
        ``seg_offsets[t]:seg_offsets[t+1]`` with every position they hold, so the same offsets
        serve token-level layers and pooled ones (see :meth:`row_offsets`).
        """
        if seg_offsets is not None and self.merged:
            raise RuntimeError("cannot serve several slots while slot 0 is merged: unmerge() first")
        self.seg_offsets, self.seg_adapter = seg_offsets, seg_adapter
        self._seg_items = int(seg_offsets[-1]) if seg_offsets is not None else 0

    def row_offsets(self, x: torch.Tensor) -> torch.Tensor | None:
        """Segment offsets in rows of ``x`` flattened to ``[rows, d]``."""
        return scale_offsets(self.seg_offsets, self._seg_items, x)

    # ---------------------------------------------------------------- forward
    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self, slot: int = 0) -> torch.Tensor:  # pragma: no cover - abstract
        """Dense ``ΔW`` of a slot in ``nn.Linear`` layout ``[d_out, d_in]`` (float32)."""
        raise NotImplementedError

    def add_adapter(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + adapter(x)``; layers whose op can accumulate into ``y`` in one pass override it."""
        return y + self.adapter_output(x).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return self.add_adapter(x, y)

    # ---------------------------------------------------------------- merging
    def _check_slot(self, slot: int) -> int:
        return check_slot(slot, self.num_clients)

    def add_to_base(self, delta: torch.Tensor) -> None:
        """Add a dense ``[d_out, d_in]`` update to the frozen base weight (in its dtype)."""
        if self.merged:
            raise RuntimeError("unmerge() before changing the base weight")
        self._add_to_base(delta)

    def _add_to_base(self, delta: torch.Tensor) -> None:
        w = self.base_layer.weight
        if self.fan_in_fan_out:
            delta = delta.T
        with torch.no_grad():
            w.copy_((w.float() + delta).to(w.dtype))

    def merge(self, slot: int = 0) -> None:
        """Add slot ``slot``'s ``ΔW`` into the frozen base weight (forward then skips the adapter)."""
        if self.merged:
            raise RuntimeError("adapter is already merged")
        if self.seg_offsets is not None:
            raise RuntimeError("cannot merge while segments are set: set_segments(None) first")
        self._merged_slot = self._check_slot(slot)
        self._add_to_base(self.delta_weight(slot))
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the base dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self._add_to_base(-self.delta_weight(self._merged_slot))
        self.merged = False
