"""``RavanLinear``: multi-head LoRA with frozen shared bases, ``ΔW = scale · Σ_i s_i B_i H_i A_i``."""

from __future__ import annotations

import torch
from torch import nn

import fedlora_kernels as fk
from fedlora.layers._base import (
    AdapterLayer,
    check_finite_scalar,
    check_int,
    check_positive_int,
    check_state_keys,
    selection_mask,
)

INITS = ("orthogonal", "gaussian")


def ravan_bases(
    d_in: int, d_out: int, heads: int, rank: int, *, init: str = "orthogonal", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen bases ``A`` ``[h, r, d_in]`` and ``B`` ``[h, d_out, r]`` from ``seed`` (float32, CPU).

    Generated on the CPU with a private generator, so every client derives bitwise-identical
    bases on any device. ``"orthogonal"``: QR of a Gaussian ``[d, h·r]`` split per head, so all
    heads' rows of ``A`` (columns of ``B``) are orthonormal together; where ``h·r > d`` each head
    is orthonormalised on its own (heads then overlap). ``"gaussian"``: entries of ``A`` drawn
    from N(0, 1/d_in) and of ``B`` from N(0, 1/r).

    Orthonormal bases need ``rank <= min(d_in, d_out)``: a head's ``r`` rows of ``A`` cannot be
    orthonormal in a space of ``d_in < r`` dimensions (nor ``B``'s ``r`` columns in ``d_out``);
    that is a ``ValueError`` (use ``init="gaussian"``, whose bases exist for any sizes, or a
    smaller ``rank``). ``heads · rank`` may exceed the dimensions (heads then overlap).
    """
    check_positive_int("d_in", d_in)
    check_positive_int("d_out", d_out)
    check_positive_int("heads", heads)
    check_positive_int("rank", rank)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    seed = check_int("seed", seed)
    if init == "orthogonal" and rank > min(d_in, d_out):
        raise ValueError(
            f"rank={rank} is larger than min(d_in={d_in}, d_out={d_out}): orthonormal bases "
            f"(init='orthogonal') need rank <= {min(d_in, d_out)} (each head's rank rows of A lie "
            f"in R^d_in, its rank columns of B in R^d_out); use a smaller rank or "
            f"init='gaussian'"
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g_a = torch.randn(d_in, heads * rank, generator=gen, dtype=torch.float64)
    g_b = torch.randn(d_out, heads * rank, generator=gen, dtype=torch.float64)
    if init == "gaussian":
        A = (g_a / d_in**0.5).T.reshape(heads, rank, d_in)
        B = (g_b / rank**0.5).reshape(d_out, heads, rank).permute(1, 0, 2)
        return A.float().contiguous(), B.float().contiguous()

    def orthonormal_columns(g: torch.Tensor) -> torch.Tensor:
        if g.shape[1] <= g.shape[0]:
            return _qr_q(g)
        return torch.cat([_qr_q(blk) for blk in g.split(rank, dim=1)], dim=1)

    qa, qb = orthonormal_columns(g_a), orthonormal_columns(g_b)
    A = qa.T.reshape(heads, rank, d_in)
    B = qb.reshape(d_out, heads, rank).permute(1, 0, 2)
    return A.float().contiguous(), B.float().contiguous()


def head_selection(heads: object, num_heads: int, device: torch.device) -> torch.Tensor:
    """Bool mask ``[num_heads]`` of the selected heads: ``None`` (all), a list / tuple / integer
    tensor of indices in ``[0, num_heads)``, or a bool tensor ``[num_heads]``. A bare int, a bool
    or a float index is a ``TypeError``; an index out of range a ``ValueError``."""
    try:
        return selection_mask("heads", heads, num_heads, device, prefix=False, what="head indices")
    except ValueError as err:
        if "must lie in" not in str(err):
            raise
        raise ValueError(f"heads must hold ints in [0, {num_heads}), got {heads!r}") from None


def _qr_q(g: torch.Tensor) -> torch.Tensor:
    """Q of a QR decomposition with a sign convention (diag(R) > 0) so it is unique."""
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))


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
        self.lora_H = nn.Parameter(
            torch.zeros(num_clients, heads, rank, rank, device=weight.device)
        )
        self.lora_s = nn.Parameter(torch.ones(num_clients, heads, device=weight.device))
        self.register_buffer(
            "head_mask",
            torch.ones(num_clients, heads, dtype=torch.bool, device=weight.device),
            persistent=False,
        )

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
        return torch.nonzero(self.head_mask[self._check_slot(slot)]).flatten().tolist()

    def adapter_output(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter's contribution for input ``x`` (plus ``base_out`` when given, fused)."""
        A, B = self.lora_A, self.lora_B
        if A.dtype != x.dtype:  # e.g. autocast or a float32 input to a bf16 model
            A, B = A.to(x.dtype), B.to(x.dtype)
        return fk.multihead_lora(
            x,
            A,
            B,
            self.lora_H,
            self.lora_s,
            scale=self.scale,
            seg_offsets=self.row_offsets(x),
            seg_adapter=self.seg_adapter,
            head_mask=self.head_mask,
            base_out=base_out,
        )

    def add_adapter(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + adapter(x)`` in one fused pass (no adapter-sized temporary on GPU)."""
        return self.adapter_output(x, base_out=y)

    def delta_weight(self, slot: int = 0) -> torch.Tensor:
        """``scale · Σ_i s_i B_i H_i A_i`` of ``slot`` as ``[d_out, d_in]`` float32."""
        self._check_slot(slot)
        A, B = self.lora_A.float(), self.lora_B.float()
        core = (
            self.lora_H[slot].detach().float() * self.lora_s[slot].detach().float()[:, None, None]
        )
        return torch.einsum("hor,hrq,hqi->oi", B, core, A) * self.scale

    # ---------------------------------------------------------------- state-dict contract
    def adapter_state(self, slot: int = 0) -> dict[str, torch.Tensor]:
        """The tensors a client exchanges for ``slot``: ``lora_H`` ``[h, r, r]``, ``lora_s`` ``[h]``.

        The bases are not included: every party derives them from the seed.
        """
        self._check_slot(slot)
        return {"lora_H": self.lora_H[slot].detach(), "lora_s": self.lora_s[slot].detach()}

    def load_adapter_state(self, state: dict[str, torch.Tensor], slot: int = 0) -> None:
        """Load ``lora_H`` / ``lora_s`` (as produced by :meth:`adapter_state`) into ``slot``."""
        self._check_slot(slot)
        expected = {"lora_H": (self.heads, self.rank, self.rank), "lora_s": (self.heads,)}
        check_state_keys("adapter state", state, tuple(expected))
        for name, shape in expected.items():
            t = state[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} holds NaN or inf")
        with torch.no_grad():
            self.lora_H[slot].copy_(state["lora_H"])
            self.lora_s[slot].copy_(state["lora_s"])
