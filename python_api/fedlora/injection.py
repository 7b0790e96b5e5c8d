"""``fedlora.inject``: replace matching linear layers of a model with adapter layers, in place."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from fedlora.layers._base import AdapterLayer, base_features


def _ravan(base: nn.Module, *, layer_seed: int, **options: Any) -> AdapterLayer:
    from fedlora.layers.ravan import RavanLinear

    return RavanLinear(base, seed=layer_seed, **options)


def _lora(base: nn.Module, *, layer_seed: int, **options: Any) -> AdapterLayer:
    from fedlora.layers.lora import LoRALinear

    return LoRALinear(base, seed=layer_seed, **options)


# the adapter layer of each layer kind a method declares (fedlora.methods.Method.layer)
_LAYER_FACTORIES: dict[str, Callable[..., AdapterLayer]] = {"lora": _lora, "ravan": _ravan}


def __getattr__(name: str) -> Any:
    # LORA_METHODS / RAVAN_METHODS: views of the method registry by layer kind
    kinds = {"LORA_METHODS": "lora", "RAVAN_METHODS": "ravan"}
    if name in kinds:
        from fedlora import methods

        return tuple(n for n in methods.names() if methods.get(n).layer == kinds[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def layer_seed(seed: int, path: str) -> int:
    """Per-layer seed: stable across processes and machines (crc32 of the module path)."""
    return (int(seed) * 1_000_003 + zlib.crc32(path.encode())) % (2**31 - 1)


def _matches(path: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def inject(
    model: nn.Module,
    method: str,
    target_modules: str | Sequence[str],
    *,
    seed: int = 0,
    **options: Any,
) -> nn.Module:
    """Wrap every ``nn.Linear``/``Conv1D`` whose path matches ``target_modules`` in place.

    ``target_modules``: a list of names (a module matches when its path equals a name or ends
    with ``"." + name``, as in PEFT) or a regular expression matched against the full path.
    ``seed`` derives each layer's frozen bases (Ravan) or shared initialisation; ``options`` go
    to the layer (e.g. ``heads``, ``rank``, ``num_clients``). The base model is frozen. Returns
    ``model``. Raises ``ValueError`` for an unknown method or when nothing matches.
    """
    from fedlora import methods

    factory = _LAYER_FACTORIES[methods.get(method).layer]  # ValueError naming the known methods
    if not isinstance(target_modules, str) and (
        not isinstance(target_modules, Sequence) or not target_modules
    ):
        raise ValueError(
            f"target_modules must be a regex or a non-empty list of names, got {target_modules!r}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    targets = []
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer) or not _matches(path, target_modules):
            continue
        try:
            base_features(module)
        except TypeError:
            continue
        targets.append((path, module))
    if not targets:
        raise ValueError(f"target_modules {target_modules!r} match no linear layer of the model")
    for path, module in targets:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = factory(module, layer_seed=layer_seed(seed, path), **options)
        setattr(parent, child, layer)
    return model
