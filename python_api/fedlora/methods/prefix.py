"""Rank prefixes of PEFT-style LoRA state dicts (HetLoRA, PreLort, FlexLoRA clients).

A client of rank ``r_k`` downloads ``A[:r_k]`` and ``B[:, :r_k]`` of every module and uploads the
same prefix. Because ``scale = alpha / R_global`` is fixed (DESIGN §2), the prefix is the same
function on every client. Keys that are not LoRA factors (a classifier head) pass through whole.
"""

from __future__ import annotations

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
