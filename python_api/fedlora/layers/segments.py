"""One batch's routing of items to adapter slots, planned once and shared by every layer.

Batched federated training runs many clients through one forward pass: items (sequences of a
``[batch, seq, d]`` input, rows of a ``[N, d]`` one) ``offsets[t]:offsets[t+1]`` form segment
``t`` and use adapter slot ``slots[t]``. A :class:`SegmentPlan` validates that description ONCE
(reading lists or CPU tensors costs no device sync), copies it to the device once, and caches the
kernel tables (:class:`fedlora_kernels.RowSegments`) per row count, so the dozens of adapter layers
of a model run their ops with no host sync and no planning of their own, as vLLM's LoRA kernel
metadata does. :func:`route` hands one plan to every slotted module of a model::

    plan = SegmentPlan([0, 4, 8], [0, 1], device="cuda")
    route(model, plan)      # every LoRALinear / RavanLinear / SlottedLinear of the model
    loss = model(x).sum()   # ... forward and backward with no host sync on the op path
    route(model, None)      # back to one segment, slot 0

Each layer's ``set_segments(offsets, slots, rank_mask=None)`` still works: it builds a plan for
that layer alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedlora_kernels.segments import RowSegments

__all__ = ["SegmentPlan", "route"]


class SegmentPlan:
    """Segments of one batch: item offsets, slots, optional per-segment rank masks.

    Args:
        offsets: ``[S+1]`` ints (list or int tensor; a CPU tensor or list avoids the one device
            sync that reading device offsets costs here): segment ``t`` is items
            ``offsets[t]:offsets[t+1]``; must start at 0 and never decrease.
        slots: ``[S]`` ints, the adapter slot of each segment (several segments may share one,
            e.g. PreLort's truncations). ``None``: segment ``t`` uses slot ``t`` (slot 0 in a
            layer with one slot).
        rank_mask: optional ``[S, R]`` 0/1 (bool preferred) per-segment LoRA rank masks,
            overriding the slots' own masks in :class:`fedlora.layers.LoRALinear` layers.
        device: where the plan's tensors live (default: the offsets' device, else CPU).

    ``ValueError`` / ``TypeError`` name the argument for anything malformed. Slots are checked
    against each layer's number of slots when it runs (host ints: no sync).
    """

    def __init__(
        self,
        offsets: torch.Tensor | Sequence[int],
        slots: torch.Tensor | Sequence[int] | None = None,
        rank_mask: torch.Tensor | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        if device is None and isinstance(offsets, torch.Tensor):
            device = offsets.device
        self.device = torch.device(device if device is not None else "cpu")
        if isinstance(offsets, torch.Tensor) and offsets.dim() == 1 and offsets.numel() < 2:
            raise ValueError(
                f"seg_offsets must have at least 2 entries ([S+1]), got shape {list(offsets.shape)}"
            )
        self.items = RowSegments(offsets, slots, device=self.device)
        self.slots_given = slots is not None
        self.num_segs = self.items.num_segs
        if rank_mask is not None:
            if not isinstance(rank_mask, torch.Tensor):
                raise TypeError(f"rank_mask must be a tensor, got {type(rank_mask).__name__}")
            if rank_mask.dim() != 2 or rank_mask.shape[0] != self.num_segs:
                raise ValueError(
                    f"rank_mask must have shape [S={self.num_segs}, R] (one row per segment), "
                    f"got {list(rank_mask.shape)}"
                )
            rank_mask = rank_mask.to(self.device)
        self.rank_mask = rank_mask
        self._rows: dict[tuple[int, bool], RowSegments] = {}
        self._one_slot: RowSegments | None = None

    @property
    def offsets(self) -> torch.Tensor:
        """Item offsets, int64 ``[S+1]`` on the plan's device."""
        return self.items.offsets

    @property
    def slots(self) -> torch.Tensor:
        """Slot of every segment, int64 ``[S]`` on the plan's device."""
        return self.items.slots

    def rows(self, x: torch.Tensor, *, one_slot: bool = False) -> RowSegments:
        """The kernel-level segments over the rows of ``x`` (``[..., d]`` flattened to rows),
        cached per row count: the first layer plans, the others reuse. ``one_slot``: a layer
        with a single slot (``slots=None`` then means slot 0 for every segment)."""
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        items = self.items.num_rows
        if items is None:  # meta / traced offsets: items are x's leading dimension
            items = x.shape[0] if x.dim() > 1 else 1
        if items == 0 or rows % items:
            raise ValueError(
                f"seg_offsets cover {items} items but the input has {rows} rows "
                f"({list(x.shape)}); the rows must be a whole number of items"
            )
        factor = rows // items
        base = self.items
        if one_slot and not self.slots_given and self.num_segs > 1:
            if self._one_slot is None:
                self._one_slot = _zero_slots(self.items)
            base = self._one_slot
        if not base.checked:
            return base.scaled(factor, num_rows=rows)
        key = (factor, base is self._one_slot)
        segs = self._rows.get(key)
        if segs is None:
            segs = self._rows[key] = base.scaled(factor)
        return segs

    def slot_rank_masks(self, slot_masks: torch.Tensor) -> torch.Tensor:
        """Per-segment rank masks ``[S, R]``: the plan's own, or each segment's slot's row of
        ``slot_masks`` ``[C, R]``."""
        if self.rank_mask is not None:
            return self.rank_mask
        return slot_masks[self.slots.to(slot_masks.device)]


def _zero_slots(items: RowSegments) -> RowSegments:
    if not items.checked:
        return RowSegments(
            items.offsets, torch.zeros_like(items.slots), num_rows=items.num_rows,
            device=items.device,
        )  # fmt: skip
    return RowSegments(
        items.offsets_list, [0] * items.num_segs, num_rows=items.num_rows, device=items.device
    )


def route(model: nn.Module, plan: SegmentPlan | None) -> None:
    """Give ``plan`` to every slotted module of ``model`` (adapter layers and slotted heads:
    anything with a ``segment_plan`` routing attribute), or clear it (``None``: one segment,
    slot 0). One plan object serves every layer, so the batch is validated and planned once."""
    if plan is not None and not isinstance(plan, SegmentPlan):
        raise TypeError(f"plan must be a SegmentPlan or None, got {type(plan).__name__}")
    from fedlora.layers._base import SegmentRouting

    for module in model.modules():
        if isinstance(module, SegmentRouting):
            module.use_plan(plan)
