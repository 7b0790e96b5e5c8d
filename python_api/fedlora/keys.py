"""Every state-dict key name and suffix of the adapter contract (DESIGN §2), in one place.

A LoRA layer at module path ``p`` travels as ``p.lora_A.weight`` ``[R, d_in]`` and
``p.lora_B.weight`` ``[d_out, R]`` (PEFT's names, paired by path, never by shape); a Ravan layer as
``p.lora_H`` ``[h, r, r]`` and ``p.lora_s`` ``[h]``. Keys a server rule returns as instructions for
the clients' frozen base weights (FLoRA's merge, FedEx-LoRA's residual) end in
:data:`SERVER_SUFFIXES` and are not adapter parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ADAPTER_SUFFIXES",
    "A_SUFFIX",
    "B_SUFFIX",
    "H_SUFFIX",
    "LORA_SUFFIXES",
    "RAVAN_SUFFIXES",
    "SERVER_SUFFIXES",
    "S_SUFFIX",
    "a_key",
    "b_key",
    "h_key",
    "is_factor_key",
    "lora_paths",
    "path_of",
    "ravan_paths",
    "s_key",
]

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
H_SUFFIX = ".lora_H"
S_SUFFIX = ".lora_s"
LORA_SUFFIXES = (A_SUFFIX, B_SUFFIX)
RAVAN_SUFFIXES = (H_SUFFIX, S_SUFFIX)
ADAPTER_SUFFIXES = LORA_SUFFIXES + RAVAN_SUFFIXES
MERGE_A, MERGE_B = ".lora_merge_A", ".lora_merge_B"
RESIDUAL_A, RESIDUAL_B = ".lora_residual_A", ".lora_residual_B"
SERVER_SUFFIXES = (MERGE_A, MERGE_B, RESIDUAL_A, RESIDUAL_B)


def a_key(path: str) -> str:
    """Key of the ``A`` factor of the LoRA layer at ``path``."""
    return path + A_SUFFIX


def b_key(path: str) -> str:
    """Key of the ``B`` factor of the LoRA layer at ``path``."""
    return path + B_SUFFIX


def h_key(path: str) -> str:
    """Key of the stacked Ravan cores ``H`` ``[h, r, r]`` of the layer at ``path``."""
    return path + H_SUFFIX


def s_key(path: str) -> str:
    """Key of the Ravan head scalars ``s`` ``[h]`` of the layer at ``path``."""
    return path + S_SUFFIX


def is_factor_key(key: str) -> bool:
    """True for ``<path>.lora_A.weight`` and ``<path>.lora_B.weight``."""
    return key.endswith(LORA_SUFFIXES)


def path_of(key: str) -> str | None:
    """The module path of an adapter key (any of :data:`ADAPTER_SUFFIXES`), else None."""
    for suffix in ADAPTER_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def lora_paths(keys: Iterable[str]) -> list[str]:
    """Module paths of the LoRA layers among ``keys`` (those with an ``A`` key), in order."""
    return [k[: -len(A_SUFFIX)] for k in keys if k.endswith(A_SUFFIX)]


def ravan_paths(keys: Iterable[str]) -> list[str]:
    """Module paths of the Ravan layers among ``keys`` (those with an ``H`` key), in order."""
    return [k[: -len(H_SUFFIX)] for k in keys if k.endswith(H_SUFFIX)]
