"""The state-dict contract (DESIGN §2): flat ``dict[str, Tensor]`` with PEFT-style keys.

Every adapter layer at module path ``p`` contributes ``p.<name>`` for each tensor of its
``adapter_state()`` (``p.lora_A.weight``/``p.lora_B.weight`` for LoRA, ``p.lora_H``/``p.lora_s``
for Ravan). ``modules_to_save`` adds whole ordinary modules (e.g. a classifier head) under their
own parameter names. Exported tensors are float32 by default: numpy and Flower cannot carry bf16.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from fedlora import keys
from fedlora.layers._base import AdapterLayer, AdapterStateError

__all__ = [
    "AdapterStateError",
    "adapter_layers",
    "apply_base_merges",
    "get_adapter_state_dict",
    "set_adapter_state_dict",
    "slotted_modules",
]


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """``(module path, layer)`` of every adapter layer in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def slotted_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of every module with per-slot state: adapter layers and slotted heads
    (anything with ``adapter_state`` / ``load_adapter_state`` / ``set_segments``)."""
    for name, module in model.named_modules():
        if all(hasattr(module, a) for a in ("adapter_state", "load_adapter_state", "set_segments")):
            yield name, module


def _saved_modules(model: nn.Module, modules_to_save: Iterable[str]) -> dict[str, nn.Module]:
    found = {}
    for want in modules_to_save:
        module = dict(model.named_modules()).get(want)
        if module is None:
            raise ValueError(f"modules_to_save: model has no module named {want!r}")
        found[want] = module
    return found


def get_adapter_state_dict(
    model: nn.Module,
    *,
    slot: int = 0,
    modules_to_save: Iterable[str] = (),
    dtype: torch.dtype | None = torch.float32,
) -> dict[str, torch.Tensor]:
    """Adapter tensors of ``slot`` (plus ``modules_to_save``) as a flat, detached, copied dict.

    ``dtype=None`` keeps each tensor's own dtype.
    """
    out: dict[str, torch.Tensor] = {}
    for path, layer in slotted_modules(model):
        for name, t in layer.adapter_state(slot).items():
            out[f"{path}.{name}"] = t
    for path, module in _saved_modules(model, modules_to_save).items():
        for name, t in module.state_dict().items():
            out[f"{path}.{name}"] = t
    if not out:
        raise ValueError("model has no adapter layers: call fedlora.inject(...) first")
    return {
        k: (v.detach().to(dtype) if dtype is not None else v.detach()).clone()
        for k, v in out.items()
    }


def set_adapter_state_dict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    slot: int = 0,
    modules_to_save: Iterable[str] = (),
    strict: bool = True,
) -> list[str]:
    """Load a dict made by :func:`get_adapter_state_dict` (or an aggregation) into ``slot``.

    Returns the keys of ``state`` that were not used. With ``strict`` (default) unused keys or an
    adapter layer missing from ``state`` raise :class:`AdapterStateError` (a ``ValueError``, and
    a ``KeyError`` for older callers) naming the keys; each layer checks its own entries (missing
    or unexpected names, shapes, NaN/inf) and names them the same way.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.device.type not in ("cpu", "cuda"):
            raise TypeError(
                f"state[{key!r}] is on the {value.device.type!r} device: loading reads values, "
                "so it must be on the CPU or a CUDA device (a 'meta' tensor has none)"
            )
    used: set[str] = set()
    for path, layer in slotted_modules(model):
        prefix = f"{path}."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        wanted = set(layer.adapter_state(slot))
        sub = {k: v for k, v in sub.items() if k in wanted}
        if not sub:
            if strict:
                raise AdapterStateError(
                    f"state has no entries for adapter layer {path!r} (expected keys "
                    f"{sorted(prefix + k for k in wanted)})"
                )
            continue
        layer.load_adapter_state(sub, slot)
        used.update(prefix + k for k in sub)
    for path, module in _saved_modules(model, modules_to_save).items():
        prefix = f"{path}."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=strict)
        used.update(prefix + k for k in sub)
    unused = sorted(set(state) - used)
    if strict and unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise AdapterStateError(f"state has keys the model does not use: {unused[:5]}{more}")
    return unused


# keys through which a server tells clients to fold a low-rank product into their frozen base
# (FLoRA: the stacked client factors; FedEx-LoRA: the residual), as ``(B key, A key)`` suffixes
# (:data:`fedlora.keys.SERVER_SUFFIXES`)
BASE_MERGE_SUFFIXES = ((keys.MERGE_B, keys.MERGE_A), (keys.RESIDUAL_B, keys.RESIDUAL_A))


def apply_base_merges(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold every ``scale · B_m A_m`` instruction of ``state`` into the matching layer's frozen
    base weight, and return ``state`` without those keys (the adapter state to load).

    FLoRA's and FedEx-LoRA's aggregations return such instructions (``<path>.lora_merge_B/A``,
    ``<path>.lora_residual_B/A``); ``scale`` is the layer's own. A path with no adapter layer
    raises :class:`AdapterStateError` (a ``ValueError`` and a ``KeyError``).
    """
    layers = dict(adapter_layers(model))
    rest = dict(state)
    for b_suffix, a_suffix in BASE_MERGE_SUFFIXES:
        for key in [k for k in state if k.endswith(b_suffix)]:
            path = key[: -len(b_suffix)]
            if path not in layers or path + a_suffix not in state:
                raise AdapterStateError(
                    f"merge instruction {key!r} has no adapter layer or no {a_suffix} partner"
                )
            B, A = rest.pop(key).float(), rest.pop(path + a_suffix).float()
            layers[path].add_to_base(layers[path].scale * (B @ A))
    return rest
