"""``SlottedLinear``: a small fully trainable layer (e.g. a classifier head) with one copy per slot.

Federated fine-tuning trains and averages a task head beside the adapters. In the batched
simulator every client needs its own head in the same forward pass, so the head keeps
``num_clients`` weight copies and routes rows by segment exactly like the adapter layers.
"""

from __future__ import annotations

import torch
from torch import nn

from fedlora.layers._base import SegmentRouting, check_positive_int, check_slot, check_state_keys


class SlottedLinear(SegmentRouting, nn.Module):
    """``y_n = W_c x_n + b_c`` where ``c`` is the slot of row ``n``'s segment.

    Built from an ``nn.Linear`` (its weights initialise every slot). State-dict entries per slot
    are ``weight`` ``[out, in]`` and ``bias`` ``[out]``, the keys an ``nn.Linear`` would have, so
    a global state written by a plain model loads here and back.
    """

    def __init__(self, linear: nn.Linear, num_clients: int = 1) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_positive_int("num_clients", num_clients)
        self.num_clients = num_clients
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        b = linear.bias.detach() if linear.bias is not None else torch.zeros(self.out_features)
        self.weight = nn.Parameter(w.float().unsqueeze(0).repeat(num_clients, 1, 1))
        self.bias = nn.Parameter(b.float().unsqueeze(0).repeat(num_clients, 1))
        self._route(None, None)

    def set_segments(
        self, seg_offsets: torch.Tensor | None, seg_adapter: torch.Tensor | None = None
    ) -> None:
        """Route the next calls' inputs to slots (``None``: slot 0), like the adapter layers."""
        self._route(seg_offsets, seg_adapter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if self.segment_plan is None:
            y = x2 @ self.weight[0].T + self.bias[0]
        else:
            segs = self.row_segments(x)
            segs.check(x2.shape[0], self.num_clients)
            slot = segs.row_slots()
            y = torch.einsum("ni,noi->no", x2, self.weight[slot]) + self.bias[slot]
        return y.reshape(*x.shape[:-1], self.out_features)

    def _check_slot(self, slot: int) -> int:
        return check_slot(slot, self.num_clients)

    def adapter_state(self, slot: int = 0) -> dict[str, torch.Tensor]:
        """``weight`` and ``bias`` of ``slot``."""
        self._check_slot(slot)
        return {"weight": self.weight[slot].detach(), "bias": self.bias[slot].detach()}

    def load_adapter_state(self, state: dict[str, torch.Tensor], slot: int = 0) -> None:
        """Load ``weight`` / ``bias`` into ``slot``."""
        self._check_slot(slot)
        check_state_keys("head state", state, ("weight", "bias"))
        for name, shape in (("weight", self.weight.shape[1:]), ("bias", self.bias.shape[1:])):
            if tuple(state[name].shape) != tuple(shape):
                raise ValueError(
                    f"{name} must have shape {list(shape)}, got {list(state[name].shape)}"
                )
        with torch.no_grad():
            self.weight[slot].copy_(state["weight"])
            self.bias[slot].copy_(state["bias"])
