"""``SlotAdamW``: AdamW over slot-stacked adapter parameters, one optimizer state per client.

Every trainable tensor of a slotted model has the client slot as its first dimension, and AdamW
is elementwise, so one stacked step equals one step per client exactly, provided each client has
its own step count and clients that are not training (finished their local steps, or frozen
components) are left untouched. Both engines of the simulator use this optimizer (the
sequential engine with one slot), which is what makes their numbers agree. The step itself is
:func:`fedlora_kernels.masked_adamw_` (fused on GPU; masked components keep parameter and
moments bitwise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import fedlora_kernels as fk
from fedlora.layers.head import SlottedLinear
from fedlora.layers.lora import LoRALinear
from fedlora.layers.ravan import RavanLinear

# (parameter, view as [C, K, rest] or [C, rest, K], rank_dim of that view, component-mask fn)
_Entry = tuple[
    nn.Parameter, Callable[[torch.Tensor], torch.Tensor], int, Callable[[], torch.Tensor]
]


def _entries(model: nn.Module) -> list[_Entry]:
    out: list[_Entry] = []
    for module in model.modules():
        if isinstance(module, LoRALinear):
            m = module

            def comp(m: LoRALinear = m) -> torch.Tensor:
                return m.grad_mask & m.rank_mask

            out.append((m.lora_A, lambda t: t, 0, comp))
            out.append((m.lora_B, lambda t: t, 1, comp))
        elif isinstance(module, RavanLinear):
            m = module

            def heads(m: RavanLinear = m) -> torch.Tensor:
                return m.head_mask

            out.append((m.lora_H, lambda t: t.flatten(2), 0, heads))
            out.append((m.lora_s, lambda t: t.unsqueeze(-1), 0, heads))
        elif isinstance(module, SlottedLinear):
            m = module

            def whole(m: SlottedLinear = m) -> torch.Tensor:
                return torch.ones(m.num_clients, 1, dtype=torch.bool, device=m.weight.device)

            out.append((m.weight, lambda t: t.flatten(1).unsqueeze(1), 0, whole))
            out.append((m.bias, lambda t: t.unsqueeze(1), 0, whole))
    return [e for e in out if e[0].requires_grad]


class SlotAdamW:
    """AdamW with per-slot step counts and per-slot, per-component masks.

    ``step(active)``: ``active`` ``[C]`` bool, the slots that take this step. Gradients of
    parameters without ``.grad`` count as zero for the active slots.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.entries = _entries(model)
        if not self.entries:
            raise ValueError("model has no trainable slotted parameters")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.num_slots = self.entries[0][0].shape[0]
        device = self.entries[0][0].device
        self.steps = torch.zeros(self.num_slots, dtype=torch.long, device=device)
        self.state = [
            (torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32))
            for p, *_ in self.entries
        ]

    def zero_grad(self) -> None:
        for p, *_ in self.entries:
            p.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, slots: torch.Tensor) -> torch.Tensor:
        """Clip each of ``slots``' (``[C]`` bool) gradient to total norm ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` over that slot's parameters alone (the 2-norm of the
        per-tensor norms; factor ``max_norm / (norm + 1e-6)`` when below 1). Each slot's norm is
        computed from its own rows only, so a slot's clipping does not depend on the others.
        Returns the per-slot norms before clipping (0 for slots not given)."""
        norms = torch.zeros(self.num_slots, dtype=torch.float32)
        grads = [p.grad for p, *_ in self.entries if p.grad is not None]
        for c in torch.nonzero(slots.cpu()).flatten().tolist():
            if not grads:
                break
            per = torch.stack([torch.linalg.vector_norm(g[c].float()) for g in grads])
            norm = torch.linalg.vector_norm(per)
            norms[c] = norm.cpu()
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g[c].mul_(coef.to(g.dtype))
        return norms

    @torch.no_grad()
    def step(self, active: torch.Tensor, lr: float | list[float] | None = None) -> None:
        """One step of the ``active`` slots; ``lr``: one learning rate, or one per slot (a
        schedule at each slot's own step), default the optimizer's."""
        active = active.to(self.steps.device).bool()
        self.steps += active.long()
        lrs = [self.lr] * self.num_slots if lr is None else lr
        if isinstance(lrs, (int, float)):
            lrs = [float(lrs)] * self.num_slots
        if len(lrs) != self.num_slots:
            raise ValueError(f"lr: one value per slot ({self.num_slots}), got {len(lrs)}")
        groups: dict[float, list[int]] = {}
        for c in torch.nonzero(active.cpu()).flatten().tolist():
            groups.setdefault(float(lrs[c]), []).append(c)
        for value, members in groups.items():
            act = torch.zeros_like(active)
            act[members] = True
            self._step(act[:, None], value)

    def _step(self, act: torch.Tensor, lr: float) -> None:
        for (p, view, rank_dim, comp), (m, v) in zip(self.entries, self.state, strict=True):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            mask = comp() & act
            fk.masked_adamw_(
                view(p.data),
                view(grad),
                view(m),
                view(v),
                mask,
                lr=lr,
                betas=self.betas,
                eps=self.eps,
                weight_decay=self.weight_decay,
                step=self.steps.clamp_min(1),
                rank_dim=rank_dim,
            )
