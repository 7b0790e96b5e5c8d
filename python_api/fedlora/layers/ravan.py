"""``RavanLinear``: multi-head LoRA with frozen shared bases, ``ΔW = scale · Σ_i s_i B_i H_i A_i``."""

from __future__ import annotations

import torch
from torch import nn

from fedlora.layers._base import (
    AdapterLayer,
    check_finite_scalar,
    check_int,
    check_positive_int,
    check_state_keys,
)
from fedlora.layers._core import (
    H_NAME,
    S_NAME,
    head_selection,
    mask_indices,
    ravan_bases,
    ravan_cores,
    ravan_delta_weight,
    ravan_forward,
)

__all__ = ["RavanLinear", "head_selection", "ravan_bases"]


class RavanLinear(AdapterLayer):
    """Drop-in replacement for an ``nn.Linear`` (or transformers ``Conv1D``) with a Ravan adapter.

    ``y = base(x) + scale · Σ_i s_i · B_i H_i A_i x``. The base layer and the bases ``lora_A``
    ``[h, r, d_in]`` / ``lora_B`` ``[h, d_out, r]`` (buffers, derived from ``seed``) are frozen;
    the cores ``lora_H`` ``[num_clients, h, r, r]`` (zeros, so the layer starts as the base layer)
    and scalars ``lora_s`` ``[num_clients, h]`` (ones) train, one set per client slot. Heads a
    client does not train are set with :meth:`set_trainable_heads` (their gradients are exactly
    zero). Trainable tensors are kept in float32 whatever the base dtype.
    """

    def __init__(
        self,
        base: nn.Module,
        heads: int = 4,
        rank: int = 8,
        scale: float = 1.0,
        init: str = "orthogonal",
        seed: int = 0,
        num_clients: int = 1,
    ) -> None:
        super().__init__(base, num_clients)
        check_positive_int("heads", heads)
        check_positive_int("rank", rank)
        scale = check_finite_scalar("scale", scale)
        seed = check_int("seed", seed)
        self.heads, self.rank, self.scale, self.init, self.seed = heads, rank, scale, init, seed
        weight = base.weight
        A, B = ravan_bases(self.in_features, self.out_features, heads, rank, init=init, seed=seed)
        self.register_buffer("lora_A", A.to(device=weight.device, dtype=weight.dtype))
        self.register_buffer("lora_B", B.to(device=weight.device, dtype=weight.dtype))
        H, s, head_mask = ravan_cores(heads, rank, slots=(num_clients,), device=weight.device)
        self.lora_H, self.lora_s = nn.Parameter(H), nn.Parameter(s)
        self.register_buffer("head_mask", head_mask, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, heads={self.heads}, "
            f"rank={self.rank}, scale={self.scale}, init={self.init!r}, seed={self.seed}, "
            f"num_clients={self.num_clients}"
        )

    def set_trainable_heads(self, heads: list[int] | torch.Tensor | None, slot: int = 0) -> None:
        """Train only ``heads`` of ``slot``: a list (or integer tensor) of head indices, a bool
        tensor ``[heads]``, or ``None`` for all heads (see :func:`head_selection`)."""
        slot = self._check_slot(slot)
        self.head_mask[slot] = head_selection(heads, self.heads, self.head_mask.device)

    def trainable_heads(self, slot: int = 0) -> list[int]:
        """Indices of the heads ``slot`` trains."""
        return mask_indices(self.head_mask[self._check_slot(slot)])

    def adapter_output(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor | None = None,
        base_weight: torch.Tensor | None = None,
        base_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The adapter's contribution for input ``x``; plus ``base_out`` when given, or the
        whole layer with ``base_weight`` / ``base_bias`` (see :meth:`AdapterLayer._fusable_base`)."""
        return ravan_forward(
            x,
            self.lora_A,
            self.lora_B,
            self.lora_H,
            self.lora_s,
            scale=self.scale,
            segments=self.row_segments(x),
            head_mask=self.head_mask,
            base_out=base_out,
            base_weight=base_weight,
            base_bias=base_bias,
        )

    def delta_weight(self, slot: int = 0) -> torch.Tensor:
        """``scale · Σ_i s_i B_i H_i A_i`` of ``slot`` as ``[d_out, d_in]`` float32."""
        self._check_slot(slot)
        return ravan_delta_weight(
            self.lora_A, self.lora_B, self.lora_H[slot], self.lora_s[slot], self.scale
        )

    # ---------------------------------------------------------------- state-dict contract
    def adapter_state(self, slot: int = 0) -> dict[str, torch.Tensor]:
        """The tensors a client exchanges for ``slot``: ``lora_H`` ``[h, r, r]``, ``lora_s`` ``[h]``.

        The bases are not included: every party derives them from the seed.
        """
        self._check_slot(slot)
        return {H_NAME: self.lora_H[slot].detach(), S_NAME: self.lora_s[slot].detach()}

    def load_adapter_state(self, state: dict[str, torch.Tensor], slot: int = 0) -> None:
        """Load ``lora_H`` / ``lora_s`` (as produced by :meth:`adapter_state`) into ``slot``."""
        self._check_slot(slot)
        expected = {H_NAME: (self.heads, self.rank, self.rank), S_NAME: (self.heads,)}
        check_state_keys("adapter state", state, tuple(expected))
        for name, shape in expected.items():
            t = state[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} holds NaN or inf")
        with torch.no_grad():
            self.lora_H[slot].copy_(state[H_NAME])
            self.lora_s[slot].copy_(state[S_NAME])
