"""What every adapter layer shares: wrapping a frozen base layer, merging, batched segments."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedlora_kernels._dispatch import check_finite_scalar, check_int, check_segment_offsets_arg

if TYPE_CHECKING:
    from fedlora.layers.segments import SegmentPlan
    from fedlora_kernels.segments import RowSegments

__all__ = [
    "AdapterLayer",
    "AdapterStateError",
    "SegmentRouting",
    "base_features",
    "check_finite_scalar",
    "check_int",
    "check_positive_int",
    "check_slot",
    "check_state_keys",
    "is_conv1d",
    "selection_mask",
]


def is_conv1d(layer: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style: weight stored ``[d_in, d_out]``)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and hasattr(layer, "weight")


def base_features(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or transformers ``Conv1D``; TypeError otherwise."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if is_conv1d(layer):
        d_in, d_out = layer.weight.shape
        return int(d_in), int(d_out)
    raise TypeError(
        f"base must be an nn.Linear or a transformers Conv1D, got {type(layer).__name__}"
    )


class AdapterStateError(ValueError, KeyError):
    """A state dict that does not fit the model: missing or unexpected keys, wrong shapes.

    A ``ValueError`` (bad input, named key by key); also a ``KeyError`` so that code written
    against the earlier behaviour (``except KeyError``) keeps working.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


def check_state_keys(
    what: str, state: object, required: Sequence[str], optional: Sequence[str] = ()
) -> None:
    """Check that ``state`` is a dict holding exactly ``required`` (plus any of ``optional``)
    tensor entries; ``TypeError`` / :class:`AdapterStateError` naming the keys otherwise."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{what} must be a dict of tensors, got {type(state).__name__}")
    missing = [k for k in required if k not in state]
    unexpected = sorted(str(k) for k in state if k not in required and k not in optional)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing}")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected}")
        raise AdapterStateError(
            f"{what} has {' and '.join(parts)}; expected exactly {list(required)}"
        )
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what}[{k!r}] must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{what}[{k!r}] must be a floating tensor, got dtype {v.dtype}")


def selection_mask(
    name: str,
    selection: object,
    size: int,
    device: torch.device,
    *,
    prefix: bool,
    what: str = "component indices",
) -> torch.Tensor:
    """Bool mask ``[size]`` from a selection: ``None`` (all), a prefix length (an int in
    ``[0, size]``, when ``prefix``), a list / tuple / range / integer tensor of indices in
    ``[0, size)``, or a bool tensor ``[size]`` (the mask itself).

    Anything else (a bool or float where an int is expected, floats among the indices, a float
    tensor) is a ``TypeError`` naming ``name``; out-of-range values are a ``ValueError``. Values
    are never rounded or coerced.
    """
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    if selection is None:
        return mask.fill_(True)
    if isinstance(selection, numbers.Integral) and not isinstance(selection, bool):
        if not prefix:
            raise TypeError(f"{name} must be a list of {what} or None, got int {selection!r}")
        if not 0 <= selection <= size:
            raise ValueError(f"{name}: a rank must lie in [0, {size}], got {selection}")
        mask[: int(selection)] = True
        return mask
    kinds = (
        "an int (a prefix length), a list of indices or None"
        if prefix
        else f"a list of {what} or None"
    )
    if isinstance(selection, torch.Tensor):
        if selection.dtype == torch.bool:
            if tuple(selection.shape) != (size,):
                raise ValueError(
                    f"{name}: a bool mask must have shape [{size}], got {list(selection.shape)}"
                )
            return mask | selection.to(device)
        if selection.is_floating_point() or selection.is_complex():
            raise TypeError(f"{name} must hold integer {what}, got a tensor of {selection.dtype}")
        idx = selection.flatten().to(torch.long)
    elif isinstance(selection, (list, tuple, range)):
        for i in selection:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(
                    f"{name} must hold int {what}, got {type(i).__name__} {i!r} in {selection!r}"
                )
        idx = torch.tensor([int(i) for i in selection], dtype=torch.long)
    else:
        raise TypeError(f"{name} must be {kinds}, got {type(selection).__name__} {selection!r}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise ValueError(f"{name}: {what} must lie in [0, {size}), got {idx.tolist()}")
    mask[idx.to(device)] = True
    return mask


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


class SegmentRouting:
    """Routing of input rows to slots, shared by the adapter layers and the slotted head: the
    batch's :class:`fedlora.layers.segments.SegmentPlan` (``None``: everything slot 0), given by
    :func:`fedlora.layers.segments.route` (one plan for every layer of a model) or built by the
    layer's own ``set_segments``."""

    segment_plan: SegmentPlan | None = None

    def use_plan(self, plan: SegmentPlan | None) -> None:
        """Route the next calls with ``plan`` (shared with other layers; ``None`` clears)."""
        self.segment_plan = plan

    def _plan_device(self) -> torch.device | None:
        """Where this module's tensors live (the plan's tables must live there too)."""
        for t in self.parameters():  # type: ignore[attr-defined]
            return t.device
        return None

    def _route(
        self,
        seg_offsets: torch.Tensor | None,
        seg_adapter: torch.Tensor | None,
        rank_mask: torch.Tensor | None = None,
    ) -> None:
        from fedlora.layers.segments import SegmentPlan

        if seg_offsets is None:
            if seg_adapter is not None:
                raise ValueError("seg_offsets is required when seg_adapter is given")
            self.segment_plan = None
            return
        check_segment_offsets_arg(seg_offsets)
        self.segment_plan = SegmentPlan(
            seg_offsets, seg_adapter, rank_mask, device=self._plan_device()
        )

    @property
    def seg_offsets(self) -> torch.Tensor | None:
        """Item offsets of the current plan (``None`` without one)."""
        return self.segment_plan.offsets if self.segment_plan is not None else None

    @property
    def seg_adapter(self) -> torch.Tensor | None:
        """Segment slots of the current plan, when it names them."""
        plan = self.segment_plan
        return plan.slots if plan is not None and plan.slots_given else None

    def row_segments(self, x: torch.Tensor) -> RowSegments | None:
        """The plan's kernel-level segments over the rows of ``x`` (cached in the plan), or
        ``None`` (one segment, slot 0)."""
        plan = self.segment_plan
        if plan is None:
            return None
        segs = plan.rows(x, one_slot=self.num_clients == 1)  # type: ignore[attr-defined]
        segs.check(x.numel() // x.shape[-1], self.num_clients)  # type: ignore[attr-defined]
        return segs

    def row_offsets(self, x: torch.Tensor) -> torch.Tensor | None:
        """Segment offsets in rows of ``x`` flattened to ``[rows, d]``."""
        segs = self.row_segments(x)
        return segs.offsets if segs is not None else None


class AdapterLayer(SegmentRouting, nn.Module):
    """A frozen base linear layer plus a low-rank adapter with ``num_clients`` slots.

    Subclasses provide :meth:`adapter_output` and :meth:`delta_weight`. The base layer's
    parameters are frozen. Batched simulation sets per-call segments with :meth:`set_segments`
    (rows ``seg_offsets[t]:seg_offsets[t+1]`` of the flattened input use slot ``seg_adapter[t]``).
    ``lora_dropout``: dropout on the adapter's input (not the base's) while the layer is in
    training mode, as PEFT's ``lora_dropout`` (``fedlora.local`` sets it for its loop).
    """

    #: dropout probability on the adapter input in training mode (0: none)
    lora_dropout: float = 0.0

    def __init__(self, base: nn.Module, num_clients: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = base_features(base)
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(
                f"base must have in_features >= 1 and out_features >= 1, got "
                f"in_features={self.in_features}, out_features={self.out_features}"
            )
        check_positive_int("num_clients", num_clients)
        self.base_layer = base
        self.fan_in_fan_out = is_conv1d(base)
        self.num_clients = num_clients
        for p in base.parameters():
            p.requires_grad_(False)
        self.merged = False
        self._route(None, None)

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
        self._route(seg_offsets, seg_adapter)

    # ---------------------------------------------------------------- forward
    def adapter_output(  # pragma: no cover - abstract
        self,
        x: torch.Tensor,
        base_out: torch.Tensor | None = None,
        base_weight: torch.Tensor | None = None,
        base_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The adapter's contribution for input ``x``; plus ``base_out`` when given, or the
        whole layer ``x Wᵀ + b + adapter`` with ``base_weight`` / ``base_bias`` (fused)."""
        raise NotImplementedError

    def delta_weight(self, slot: int = 0) -> torch.Tensor:  # pragma: no cover - abstract
        """Dense ``ΔW`` of a slot in ``nn.Linear`` layout ``[d_out, d_in]`` (float32)."""
        raise NotImplementedError

    def add_adapter(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + adapter(x)``, accumulated into ``y`` by the op in one pass (``base_out``): no
        adapter-sized temporary, no separate add (DESIGN §8's roofline)."""
        return self.adapter_output(x, base_out=y)

    def check_input(self, x: object) -> torch.Tensor:
        """Check the forward input against the layer (metadata only: no sync, traceable).

        ``x`` must be a floating tensor ``[..., in_features]`` of the base weight's dtype (any
        dtype under ``torch.autocast``, or when the base weight is not floating, e.g. quantised).
        Raises ``TypeError`` / ``ValueError`` naming the input; without this check a wrong size
        or dtype reaches torch as an anonymous matmul error.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input x must have shape [..., in_features={self.in_features}], "
                f"got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"input x must be a floating-point tensor, got dtype {x.dtype}")
        a = getattr(self, "lora_A", None)  # the adapter's device (the base may be offloaded)
        if isinstance(a, torch.Tensor) and a.device != x.device:
            raise ValueError(
                f"input x is on {x.device} but the adapter's weights are on {a.device} (a "
                "'meta' layer holds no values: materialise it with .to_empty(device=...) and "
                "load its weights)"
            )
        w = self.base_layer.weight
        if (
            w.is_floating_point()
            and x.dtype != w.dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            raise TypeError(
                f"input x must have the base layer's dtype {w.dtype} (or run under "
                f"torch.autocast), got {x.dtype}"
            )
        return x

    #: let the adapter op compute a plain ``nn.Linear`` base itself (see :meth:`_fusable_base`)
    fuse_base: bool = True

    def _fusable_base(self, x: torch.Tensor) -> bool:
        """Whether the op may own the base GEMM (``base_weight``): a plain frozen ``nn.Linear``
        without hooks, in ``x``'s dtype, outside autocast. The op then accumulates the adapter
        into the base output in place and, in backward, its input gradient into ``dy W`` in the
        same pass: no separate ``[N, d]`` add in either direction."""
        base = self.base_layer
        if not self.fuse_base or type(base) is not nn.Linear:
            return False
        if base._forward_hooks or base._forward_pre_hooks:
            return False
        w, b = base.weight, base.bias
        if w.dtype != x.dtype or w.requires_grad or (b is not None and b.requires_grad):
            return False
        try:
            return not torch.is_autocast_enabled(x.device.type)
        except RuntimeError:  # a device type without autocast (meta): nothing to cast
            return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.merged:
            return self.base_layer(x)
        if self.lora_dropout and self.training:  # dropout on the adapter input only, as PEFT
            y = self.base_layer(x)
            return self.add_adapter(nn.functional.dropout(x, self.lora_dropout, training=True), y)
        if self._fusable_base(x):
            base = self.base_layer
            return self.adapter_output(x, base_weight=base.weight, base_bias=base.bias)
        return self.add_adapter(x, self.base_layer(x))

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
        if not w.is_floating_point():  # a bitsandbytes 4-/8-bit base: dequantize, add, requantize
            from fedlora.quantize import dense_weight, set_dense_weight

            set_dense_weight(self.base_layer, dense_weight(self.base_layer) + delta.float())
            return
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
