"""``LoRALinear``: LoRA with per-slot rank truncation and per-component freezing.

The layer behind FedIT, FFA-LoRA, HetLoRA, FlexLoRA, FLoRA, FedEx-LoRA, HAFL, PreLort and FLoRA-NA.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from fedlora.layers._base import (
    AdapterLayer,
    check_finite_scalar,
    check_int,
    check_positive_int,
    check_state_keys,
    selection_mask,
)
from fedlora.layers._core import (
    A_NAME,
    B_NAME,
    LORA_INITS,
    check_init,
    lora_delta_weight,
    lora_factors,
    lora_forward,
    lora_init_A,
)

__all__ = ["LoRALinear", "lora_init_A"]


class LoRALinear(AdapterLayer):
    """Drop-in replacement for an ``nn.Linear`` (or transformers ``Conv1D``) with a LoRA adapter.

    ``y = base(x) + scale · ((x A_cᵀ) ⊙ m) B_cᵀ`` with ``scale = alpha / rank`` fixed by the
    global rank (DESIGN §2: a client of rank ``r_k`` trains the prefix ``A[:r_k]``,
    ``B[:, :r_k]`` at the same scale, so a prefix is the same function on every client; PEFT
    would use ``alpha / r_k``, see :func:`fedlora.state_dict` for the conversion).

    Parameters ``lora_A`` ``[num_clients, rank, d_in]`` (Kaiming-uniform as PEFT, or a Gaussian
    N(0, 1/rank) from ``seed`` shared by every client with ``init="gaussian"``) and ``lora_B``
    ``[num_clients, d_out, rank]`` (zeros), one pair per client slot. Buffers:

    - ``rank_mask`` ``[num_clients, rank]`` (0/1): which components a slot uses in the forward
      pass (a prefix for HetLoRA/PreLort truncation);
    - ``grad_mask`` ``[num_clients, rank]`` (0/1): which components train (HAFL freezing); frozen
      components get exactly zero gradient.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int = 8,
        alpha: float = 16.0,
        num_clients: int = 1,
        init: str = "kaiming",
        seed: int = 0,
    ) -> None:
        super().__init__(base, num_clients)
        check_positive_int("rank", rank)
        alpha = check_finite_scalar("alpha", alpha)
        check_init(init, LORA_INITS)
        seed = check_int("seed", seed)
        self.rank, self.alpha, self.init, self.seed = rank, alpha, init, seed
        self.scale = self.alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(num_clients, rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_clients, self.out_features, rank, device=device))
        self.reset_adapter()
        # bool masks: the ops check 0/1 masks of other dtypes with a device sync
        ones = torch.ones(num_clients, rank, dtype=torch.bool, device=device)
        self.register_buffer("rank_mask", ones.clone(), persistent=False)
        self.register_buffer("grad_mask", ones.clone(), persistent=False)

    def reset_adapter(self, slot: int | None = None) -> None:
        """Re-initialise ``A`` (as at construction, from ``seed``) and zero ``B``; all slots by default."""
        slots = range(self.num_clients) if slot is None else [self._check_slot(slot)]
        a, b = lora_factors(
            self.in_features, self.out_features, self.rank, init=self.init, seed=self.seed
        )
        with torch.no_grad():
            for c in slots:
                self.lora_A[c].copy_(a)
                self.lora_B[c].copy_(b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, init={self.init!r}, num_clients={self.num_clients}"
        )

    # ---------------------------------------------------------------- masks
    def set_rank(self, rank: int | None, slot: int = 0) -> None:
        """Use only the first ``rank`` components of ``slot`` (an int in ``[0, rank]``; ``None``:
        all). A bool, a float such as ``2.5`` or a list is a ``TypeError``, never rounded."""
        slot = self._check_slot(slot)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral)):
            raise TypeError(
                f"rank must be an int in [0, {self.rank}] (a prefix length) or None, got "
                f"{type(rank).__name__} {rank!r}"
            )
        self.rank_mask[slot] = selection_mask(
            "rank", rank, self.rank, self.rank_mask.device, prefix=True
        )

    def set_trainable(
        self, components: list[int] | torch.Tensor | int | None, slot: int = 0
    ) -> None:
        """Train only ``components`` of ``slot``: a list (or integer tensor) of component
        indices, a bool tensor ``[rank]``, a prefix length (int), or ``None`` for all. Floats and
        bools where an index is expected are a ``TypeError``, never rounded."""
        slot = self._check_slot(slot)
        self.grad_mask[slot] = selection_mask(
            "components", components, self.rank, self.grad_mask.device, prefix=True
        )

    def set_segments(
        self,
        seg_offsets: torch.Tensor | None,
        seg_adapter: torch.Tensor | None = None,
        rank_mask: torch.Tensor | None = None,
    ) -> None:
        """Route rows to slots; ``rank_mask`` ``[S, rank]`` overrides the slots' masks per segment.

        PreLort trains one slot under several truncations in one pass: give each truncation its
        own segment with the same slot and its own prefix mask. Builds a
        :class:`fedlora.layers.segments.SegmentPlan` for this layer; to route a whole model with
        one plan, use :func:`fedlora.layers.segments.route`.
        """
        if seg_offsets is not None and self.merged:
            raise RuntimeError("cannot serve several slots while slot 0 is merged: unmerge() first")
        if seg_offsets is None and rank_mask is not None:
            raise ValueError("rank_mask needs seg_offsets (one row per segment)")
        self._route(seg_offsets, seg_adapter, rank_mask)

    @property
    def seg_rank_mask(self) -> torch.Tensor | None:
        """The current plan's per-segment rank masks (``None``: the slots' own)."""
        return self.segment_plan.rank_mask if self.segment_plan is not None else None

    # ---------------------------------------------------------------- forward
    def _segment_rank_mask(self, segs) -> torch.Tensor:
        if segs is None:
            return self.rank_mask[:1]
        if self.segment_plan.rank_mask is not None:
            return self.segment_plan.rank_mask
        return self.rank_mask[segs.slots]

    def adapter_output(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor | None = None,
        base_weight: torch.Tensor | None = None,
        base_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The adapter's contribution for input ``x``; plus ``base_out`` when given, or the
        whole layer with ``base_weight`` / ``base_bias`` (see :meth:`AdapterLayer._fusable_base`)."""
        segs = self.row_segments(x)
        return lora_forward(
            x,
            self.lora_A,
            self.lora_B,
            scale=self.scale,
            rank_mask=self._segment_rank_mask(segs),
            grad_mask=self.grad_mask,
            segments=segs,
            base_out=base_out,
            base_weight=base_weight,
            base_bias=base_bias,
        )

    def delta_weight(self, slot: int = 0) -> torch.Tensor:
        """``scale · B_c diag(rank_mask_c) A_c`` as ``[d_out, d_in]`` float32."""
        self._check_slot(slot)
        return lora_delta_weight(
            self.lora_A[slot], self.lora_B[slot], self.scale, self.rank_mask[slot]
        )

    # ---------------------------------------------------------------- state-dict contract
    def adapter_state(self, slot: int = 0) -> dict[str, torch.Tensor]:
        """``lora_A.weight`` ``[rank, d_in]`` and ``lora_B.weight`` ``[d_out, rank]`` of ``slot``."""
        self._check_slot(slot)
        return {A_NAME: self.lora_A[slot].detach(), B_NAME: self.lora_B[slot].detach()}

    def load_adapter_state(self, state: dict[str, torch.Tensor], slot: int = 0) -> None:
        """Load A/B into ``slot``; a rank prefix (``[r, d_in]``, ``[d_out, r]``, r ≤ rank) loads into
        the first ``r`` components, zeroes the others and truncates the slot to rank ``r``."""
        self._check_slot(slot)
        check_state_keys("adapter state", state, (A_NAME, B_NAME))
        A, B = state[A_NAME], state[B_NAME]
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or A.shape[1] != self.in_features or not 0 <= r <= self.rank:
            raise ValueError(
                f"{A_NAME} must have shape [r <= {self.rank}, {self.in_features}], got {list(A.shape)}"
            )
        if tuple(B.shape) != (self.out_features, r):
            raise ValueError(
                f"{B_NAME} must have shape [{self.out_features}, {r}] to match {A_NAME}, got {list(B.shape)}"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError("adapter state holds NaN or inf")
        with torch.no_grad():
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            self.lora_A[slot, :r].copy_(A)
            self.lora_B[slot, :, :r].copy_(B)
        self.set_rank(r if r < self.rank else None, slot)
