"""Rank prefixes of PEFT-style LoRA state dicts (HetLoRA, PreLort, FlexLoRA clients).

A client of rank ``r_k`` downloads ``A[:r_k]`` and ``B[:, :r_k]`` of every module and uploads the
same prefix. Because ``scale = alpha / R_global`` is fixed (DESIGN §2), the prefix is the same
function on every client. Keys that are not LoRA factors (a classifier head) pass through whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fedlora.methods._common import A_SUFFIX, B_SUFFIX
from fedlora.methods._common import lora_paths as _paths


def lora_paths(state: dict[str, torch.Tensor]) -> list[str]:
    """Module paths that have both ``lora_A.weight`` and ``lora_B.weight`` in ``state``."""
    paths = _paths(state)
    missing = [p for p in paths if p + B_SUFFIX not in state]
    if missing:
        raise ValueError(f"state has lora_A without lora_B for modules {missing[:3]}")
    return paths


def truncate(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The rank-``rank`` prefix of every LoRA pair in ``state`` (other keys unchanged)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    out = dict(state)
    for path in lora_paths(state):
        A, B = state[path + A_SUFFIX], state[path + B_SUFFIX]
        if rank > A.shape[0]:
            raise ValueError(f"rank {rank} exceeds the global rank {A.shape[0]} of {path!r}")
        out[path + A_SUFFIX] = A[:rank].clone()
        out[path + B_SUFFIX] = B[:, :rank].clone()
    return out


def state_rank(state: dict[str, torch.Tensor]) -> int:
    """The (common) rank of the LoRA pairs of ``state``; ValueError if they disagree."""
    ranks = {state[p + A_SUFFIX].shape[0] for p in lora_paths(state)}
    if len(ranks) != 1:
        raise ValueError(f"state's LoRA pairs have different ranks {sorted(ranks)}")
    return ranks.pop()


def nbytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes a state dict takes on the wire (its tensors' payload)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def segment_bounds(global_rank: int, client_ranks: Iterable[int]) -> list[int]:
    """The ends of the rank segments: the distinct client ranks below ``global_rank``, then
    ``global_rank`` (segment ``i`` is the components ``[bounds[i-1], bounds[i])``, from 0)."""
    return sorted({int(r) for r in client_ranks if 0 < int(r) < global_rank} | {global_rank})


def segment_norms(state: dict[str, torch.Tensor], bounds: Sequence[int]) -> dict[str, float]:
    """``{"lo:hi": ‖ΔW_seg‖_F}`` per rank segment ``[lo, hi)`` of ``bounds``
    (:func:`segment_bounds`), over every LoRA pair of ``state``: the square root of
    ``Σ_layers ‖B[:, lo:hi] A[lo:hi]‖_F²``, each layer's term from the ``(hi−lo)²`` Gram
    matrices ``tr((BᵀB)(AAᵀ))``, never a dense ``[d_out, d_in]`` product. How much of the
    global update each segment carries, logged per round for the prefix methods."""
    out: dict[str, float] = {}
    lo = 0
    for hi in bounds:
        total = 0.0
        for path in lora_paths(state):
            A = state[path + A_SUFFIX][lo:hi].double()
            B = state[path + B_SUFFIX][:, lo:hi].double()
            total += float(torch.sum((B.T @ B) * (A @ A.T)).clamp_min(0.0))
        out[f"{lo}:{hi}"] = total**0.5
        lo = hi
    return out
