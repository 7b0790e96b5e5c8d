"""PEFT integration: fedlora's adapters as PEFT custom LoRA modules.

``register(config, method, **options)`` hands PEFT (>= 0.12) a layer class through
``LoraConfig._register_custom_module``, so the usual PEFT workflow runs on fedlora's ops::

    config = fedlora.peft.register(LoraConfig(r=8, lora_alpha=16, target_modules=["query"]), "fedit")
    model = get_peft_model(base, config)          # forward = base + fedlora_kernels.masked_lora
    sd = get_peft_model_state_dict(model)         # ``...query.lora_A.weight`` / ``...lora_B.weight``
    model.save_pretrained(path)
    model = PeftModel.from_pretrained(base2, path, config=fedlora.peft.register(config2, "fedit"))
    merged = model.merge_and_unload()

Two layer kinds:

- LoRA-form methods (FedIT, FFA-LoRA, HetLoRA, FlexLoRA, FLoRA, FedEx-LoRA, HAFL, PreLort,
  FLoRA-NA): :class:`PeftLoRALinear` keeps PEFT's own layout (``lora_A[adapter]`` is an
  ``nn.Linear(d_in, r)``, ``lora_B[adapter]`` an ``nn.Linear(r, d_out)``, no bias), so its state
  dicts have the same keys and shapes as PEFT's LoRA layer and load into it and back; with the
  same scaling they are the same function. The forward calls ``fedlora_kernels.masked_lora``.
- Ravan: :class:`PeftRavanLinear` holds the trainable cores ``lora_H[adapter]`` ``[h, r, r]`` and
  scalars ``lora_s[adapter]`` ``[h]`` (state-dict keys ``<path>.lora_H`` / ``<path>.lora_s``, as
  :func:`fedlora.get_adapter_state_dict`); the frozen bases ``lora_A``/``lora_B`` are derived from
  the seed and the module path, never saved nor sent. The forward calls
  ``fedlora_kernels.multihead_lora``. ``config.r`` is the per-head rank, ``heads`` an option.

Scaling. PEFT scales an adapter of rank ``r`` by ``lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``); fedlora fixes ``scale = alpha / R_global`` for every client so that a rank prefix
is the same function everywhere (DESIGN §2). Pass ``scale_rank=R_global`` to ``register`` to get
fedlora's convention inside PEFT, or convert state dicts at the boundary with
:func:`to_peft_state_dict` / :func:`from_peft_state_dict` (``global_rank=``).

Options the fused layers cannot honour are refused with a ``ValueError`` naming them:
``lora_dropout > 0``, ``use_dora``, ``lora_bias``, other LoRA variants (``use_qalora``, aLoRA,
Arrow, ...) and data-driven initialisations (``init_lora_weights`` other than True, False or
"gaussian"). On older PEFT use :func:`fedlora.inject` instead.

The custom-module mapping is not saved by ``save_pretrained``: call :func:`register` again (same
method and options) on the config passed to ``PeftModel.from_pretrained``. For the same reason the
layer classes (one per method and options, made by :func:`layer_class`) are not picklable by
name: save adapters with ``save_pretrained`` / state dicts, not by pickling whole models
(``copy.deepcopy`` works).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedlora import keys
from fedlora import methods as _methods
from fedlora.injection import layer_seed
from fedlora.layers import _core as core
from fedlora.layers import is_conv1d
from fedlora.layers._base import check_int, check_positive_int

# built on first access (they subclass peft's LoraLayer): see __getattr__
_LAZY = ("PeftLoRALinear", "PeftRavanLinear")

__all__ = [
    *_LAZY,
    "MIN_PEFT_VERSION",
    "check_peft_version",
    "check_config",
    "from_peft_state_dict",
    "layer_class",
    "register",
    "to_peft_state_dict",
]

#: First PEFT release with ``LoraConfig._register_custom_module``.
MIN_PEFT_VERSION = (0, 12)

_LORA_OPTIONS = {"init": "kaiming", "seed": 0, "scale_rank": None}
_RAVAN_OPTIONS = {"heads": 4, "init": "orthogonal", "seed": 0, "scale_rank": None}
# LoraConfig fields that change the layer's function in ways a fused fedlora layer does not model
_REFUSED_FLAGS = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
)
_INIT_CHOICES = (True, False, "gaussian")


# ------------------------------------------------------------------------------------- peft
def _version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release parts: ``"0.12.0rc1"`` -> ``(0, 12, 0)``."""
    parts = []
    for piece in version.split(".")[:3]:
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def check_peft_version(version: str) -> None:
    """Raise ``ImportError`` when PEFT ``version`` predates custom LoRA modules (0.12)."""
    if _version_tuple(version) < MIN_PEFT_VERSION:
        raise ImportError(
            f"fedlora.peft.register needs peft >= 0.12 (LoraConfig._register_custom_module), "
            f"found peft {version}; upgrade peft (`pip install 'peft>=0.12'`) or use the plain "
            "injection path: fedlora.inject(model, method, target_modules=[...]) with "
            "fedlora.get_adapter_state_dict / set_adapter_state_dict"
        )


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is in the dev extra
        raise ImportError(
            "fedlora.peft needs peft: `pip install 'fedlora-kernels[peft]'`; without peft use "
            "fedlora.inject(model, method, target_modules=[...])"
        ) from e
    check_peft_version(peft.__version__)
    if not hasattr(peft.LoraConfig, "_register_custom_module"):  # pragma: no cover
        check_peft_version("0.0")
    return peft


# ------------------------------------------------------------------------------------- config checks
def _setting(config: Any, kwargs: Mapping[str, Any], name: str, default: Any) -> Any:
    """A LoRA setting: from ``config`` when given (PEFT >= 0.19), else from the kwargs."""
    if config is not None and hasattr(config, name):
        return getattr(config, name)
    return kwargs.get(name, default)


def check_config(config: Any = None, **kwargs: Any) -> None:
    """Refuse LoRA settings a fedlora layer cannot honour (``ValueError`` naming the setting).

    Reads a ``LoraConfig`` (or, for PEFT versions that pass settings as keyword arguments, the
    kwargs): ``lora_dropout`` must be 0 (the fused op has no dropout on its input), ``use_dora``,
    ``lora_bias`` and the other LoRA variants must be off, and ``init_lora_weights`` must be True,
    False or ``"gaussian"``.
    """
    dropout = _setting(config, kwargs, "lora_dropout", 0.0)
    if dropout:
        raise ValueError(
            f"lora_dropout={dropout!r}: fedlora's fused adapter ops apply no dropout to the "
            "adapter input; set lora_dropout=0.0 (or use PEFT's own LoRA layers)"
        )
    names = list(_REFUSED_FLAGS)
    if config is not None and dataclasses.is_dataclass(config):
        names += [
            f.name
            for f in dataclasses.fields(config)
            if f.metadata.get("is_lora_variant") and f.name not in names
        ]
    for name in names:
        value = _setting(config, kwargs, name, None)
        if value:
            raise ValueError(
                f"{name}={value!r} is not supported by fedlora's PEFT layers (they compute plain "
                f"LoRA / Ravan adapters with fused ops); set {name} off or use PEFT's own layers"
            )
    init = _setting(config, kwargs, "init_lora_weights", True)
    if not any(init is c or (isinstance(c, str) and init == c) for c in _INIT_CHOICES):
        raise ValueError(
            f"init_lora_weights={init!r} is not supported by fedlora's PEFT layers; use True "
            "(fedlora's shared-seed init), False (random B, for tests) or 'gaussian'"
        )


# ------------------------------------------------------------------------------------- helpers
def _scaling(lora_alpha: float, r: int, use_rslora: bool, scale_rank: int | None) -> float:
    rank = scale_rank if scale_rank is not None else r
    return float(lora_alpha) / (math.sqrt(rank) if use_rslora else rank)


class _PeftLayerMixin:
    """What both PEFT-facing layers share: construction protocol, forward loop, merging.

    Subclasses set ``_fedlora_options`` (the ``register`` options) and implement
    ``_create_adapter``, ``_adapter_output`` and ``_delta_weight`` (``[d_out, d_in]`` float32)
    with the functional core :mod:`fedlora.layers._core`, as fedlora's own layers do.
    """

    _fedlora_method = "fedit"
    _fedlora_options: Mapping[str, Any] = {}

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any = None,
        r: int = 8,
        lora_alpha: float = 8,
        **kwargs: Any,
    ) -> None:
        from peft.tuners.lora.layer import LoraLayer

        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        base = self.get_base_layer()
        self.fan_in_fan_out = bool(
            _setting(config, kwargs, "fan_in_fan_out", False) or is_conv1d(base)
        )
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, config: Any = None, **kwargs: Any
    ) -> None:
        """Add adapter ``adapter_name`` of rank ``r`` (PEFT calls this for every new adapter)."""
        check_config(config, **kwargs)
        r = check_positive_int("r", r)
        use_rslora = bool(_setting(config, kwargs, "use_rslora", False))
        init = _setting(config, kwargs, "init_lora_weights", True)
        target = kwargs.get("target_name") or ""
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = _scaling(
            lora_alpha, r, use_rslora, self._fedlora_options.get("scale_rank")
        )
        self.use_rslora[adapter_name] = use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Identity()
        seed = layer_seed(self._fedlora_options.get("seed", 0), target)
        self._create_adapter(adapter_name, r, init, seed)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        inference_mode = bool(_setting(config, kwargs, "inference_mode", False))
        try:
            self.set_adapter(self.active_adapters, inference_mode=inference_mode)
        except TypeError:  # pragma: no cover - peft < 0.15 has no inference_mode argument
            self.set_adapter(self.active_adapters)

    def _has_adapter(self, name: str) -> bool:
        return name in getattr(self, self.adapter_layer_names[0])

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + Σ_active adapter(x)`` through fedlora's op (nothing added when merged)."""
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(
                "adapter_names (mixed-adapter batches) is not supported by fedlora's PEFT "
                "layers; use one active adapter per batch"
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if self._has_adapter(name):
                result = result + self._adapter_output(x, name).to(result.dtype)
        return result

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW`` of ``adapter`` in the base weight's layout (``[d_out, d_in]``; transposed for
        ``fan_in_fan_out`` / Conv1D), float32, by the same formula as fedlora's layers."""
        delta = self._delta_weight(adapter)
        return delta.T if self.fan_in_fan_out else delta

    def _add_delta(self, adapter: str, sign: float, safe_merge: bool = False) -> None:
        weight = self.get_base_layer().weight
        new = weight.detach().float() + sign * self.get_delta_weight(adapter)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
            )
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters' ``ΔW`` into the frozen base weight."""
        from peft.tuners.tuners_utils import check_adapters_to_merge

        for name in check_adapters_to_merge(self, adapter_names):
            if self._has_adapter(name):
                self._add_delta(name, 1.0, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self._has_adapter(name):
                self._add_delta(name, -1.0)

    def __repr__(self) -> str:
        return f"fedlora.{super().__repr__()}"


class _LoRAMethods(_PeftLayerMixin):
    """Plain LoRA in PEFT's layout, forward through ``fedlora_kernels.masked_lora``."""

    def _create_adapter(self, name: str, r: int, init: Any, seed: int) -> None:
        kind = "gaussian" if init == "gaussian" else self._fedlora_options.get("init", "kaiming")
        a = nn.Linear(self.in_features, r, bias=False)
        b = nn.Linear(r, self.out_features, bias=False)
        # A exactly as fedlora.inject initialises it (shared seed per module path); B zeros, or
        # random for PEFT's "no init" (init_lora_weights=False), so the adapter is not a no-op
        A, B = core.lora_factors(
            self.in_features, self.out_features, r, init=kind, seed=seed, random_b=init is False
        )
        with torch.no_grad():
            a.weight.copy_(A)
            b.weight.copy_(B)
        self.lora_A[name] = a
        self.lora_B[name] = b

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return core.lora_forward(self._cast_input_dtype(x, A.dtype), A, B, scale=self.scaling[name])

    def _delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return core.lora_delta_weight(A, B, self.scaling[name])


class _RavanMethods(_PeftLayerMixin):
    """Ravan's multi-head adapter, forward through ``fedlora_kernels.multihead_lora``."""

    def _create_adapter(self, name: str, r: int, init: Any, seed: int) -> None:
        from peft.tuners._buffer_dict import BufferDict

        options = self._fedlora_options
        heads = options["heads"]
        if not isinstance(self.lora_A, BufferDict):
            # bases are frozen, derived from the seed: non-persistent, never saved or sent
            self.lora_A = BufferDict(persistent=False)
            self.lora_B = BufferDict(persistent=False)
            self.lora_H = nn.ParameterDict()
            self.lora_s = nn.ParameterDict()
            self.lora_head_mask = BufferDict(persistent=False)
        self.lora_A[name], self.lora_B[name] = core.ravan_bases(
            self.in_features, self.out_features, heads, r, init=options["init"], seed=seed
        )
        # PEFT's "no init" (init_lora_weights=False): a random core, so the adapter is not a no-op
        H, s, head_mask = core.ravan_cores(heads, r, random_core=init is False)
        self.lora_H[name], self.lora_s[name] = nn.Parameter(H), nn.Parameter(s)
        self.lora_head_mask[name] = head_mask

    def set_trainable_heads(self, heads: list[int] | None, adapter_name: str = "default") -> None:
        """Train only ``heads`` of ``adapter_name`` (``None``: all): the other heads' ``H``/``s``
        get exactly zero gradient (Ravan clients train ``K_c`` of ``h`` heads)."""
        if not self._has_adapter(adapter_name):
            raise ValueError(f"adapter_name {adapter_name!r} is not an adapter of this layer")
        mask = self.lora_head_mask[adapter_name]
        self.lora_head_mask[adapter_name] = core.head_selection(heads, mask.shape[0], mask.device)

    def trainable_heads(self, adapter_name: str = "default") -> list[int]:
        """Indices of the heads ``adapter_name`` trains."""
        return core.mask_indices(self.lora_head_mask[adapter_name])

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return core.ravan_forward(
            x,
            self.lora_A[name],
            self.lora_B[name],
            self.lora_H[name].unsqueeze(0),
            self.lora_s[name].unsqueeze(0),
            scale=self.scaling[name],
            head_mask=self.lora_head_mask[name].unsqueeze(0),
        )

    def _delta_weight(self, name: str) -> torch.Tensor:
        H, s = self.lora_H[name], self.lora_s[name]
        return core.ravan_delta_weight(
            self.lora_A[name], self.lora_B[name], H, s, self.scaling[name]
        )


# ------------------------------------------------------------------------------------- classes
_CLASSES: dict[str, type] = {}
_REGISTERED: dict[tuple, type] = {}


def _base_classes() -> dict[str, type]:
    """Build the PEFT-facing classes once (they need peft's ``LoraLayer`` as a base)."""
    if _CLASSES:
        return _CLASSES
    _peft()
    from peft.tuners.lora.layer import LoraLayer

    class PeftLoRALinear(_LoRAMethods, nn.Module, LoraLayer):
        """PEFT custom LoRA layer computing the adapter with ``fedlora_kernels.masked_lora``.

        Same tensors, names and shapes as PEFT's ``lora.Linear`` (``lora_A``/``lora_B``
        ``ModuleDict`` of bias-free ``nn.Linear`` keyed by adapter name), so state dicts move
        between the two; ``A`` is initialised as :func:`fedlora.inject` does (shared seed per
        module path), ``B`` with zeros.
        """

        adapter_layer_names = ("lora_A", "lora_B")
        other_param_names = LoraLayer.other_param_names

    class PeftRavanLinear(_RavanMethods, nn.Module, LoraLayer):
        """PEFT custom layer for Ravan: ``ΔW = scaling · Σ_i s_i B_i H_i A_i`` per adapter.

        Trainable ``lora_H[adapter]`` ``[h, r, r]`` (zeros) and ``lora_s[adapter]`` ``[h]``
        (ones); frozen bases ``lora_A[adapter]`` ``[h, r, d_in]`` / ``lora_B[adapter]``
        ``[h, d_out, r]`` from :func:`fedlora.layers.ravan.ravan_bases` with the per-path seed
        (non-persistent: every party derives them). Forward: ``fedlora_kernels.multihead_lora``.
        """

        adapter_layer_names = (core.H_NAME, core.S_NAME)  # the keys <path>.lora_H / .lora_s
        other_param_names = (*LoraLayer.other_param_names, "lora_A", "lora_B", "lora_head_mask")

    PeftLoRALinear.__module__ = PeftRavanLinear.__module__ = __name__
    PeftLoRALinear.__qualname__, PeftRavanLinear.__qualname__ = "PeftLoRALinear", "PeftRavanLinear"
    _CLASSES.update(lora=PeftLoRALinear, ravan=PeftRavanLinear)
    return _CLASSES


def _layer_kind(method: str) -> str:
    """``"lora"`` or ``"ravan"``: the adapter the registered ``method`` uses (ValueError naming
    the known methods otherwise)."""
    return _methods.get(method).layer


def _check_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    ravan = _layer_kind(method) == "ravan"
    defaults = _RAVAN_OPTIONS if ravan else _LORA_OPTIONS
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(
            f"register() got option(s) {unknown} that method {method!r} does not take; "
            f"options: {sorted(defaults)}"
        )
    out = {**defaults, **options}
    out["seed"] = check_int("seed", out["seed"])
    if out["scale_rank"] is not None:
        check_positive_int("scale_rank", out["scale_rank"])
    if ravan:
        check_positive_int("heads", out["heads"])
        core.check_init(out["init"], core.RAVAN_INITS)
    else:
        core.check_init(out["init"], core.LORA_INITS)
    return out


def layer_class(method: str = "fedit", **options: Any) -> type:
    """The PEFT-facing layer class for ``method`` with ``options`` bound (cached per options).

    LoRA-form methods take ``init`` ("kaiming" | "gaussian"), ``seed`` and ``scale_rank``; Ravan
    takes ``heads``, ``init`` ("orthogonal" | "gaussian"), ``seed`` and ``scale_rank``.
    """
    kind = _layer_kind(method)
    resolved = _check_options(method, options)
    key = (method, tuple(sorted(resolved.items())))
    if key not in _REGISTERED:
        base = _base_classes()[kind]
        cls = type(
            base.__name__,
            (base,),
            {
                "_fedlora_method": method,
                "_fedlora_options": resolved,
                "__module__": __name__,
                "__doc__": base.__doc__,
            },
        )
        _REGISTERED[key] = cls
    return _REGISTERED[key]


def register(lora_config: Any, method: str = "fedit", **options: Any) -> Any:
    """Make ``lora_config`` build fedlora layers for ``method``; returns the same config.

    Registers the layer class of :func:`layer_class` for ``nn.Linear`` (and transformers'
    ``Conv1D`` when transformers is installed) with ``lora_config._register_custom_module``.
    Raises ``TypeError`` when ``lora_config`` is not a ``peft.LoraConfig``, ``ValueError`` for an
    unknown method or a setting the layers cannot honour (see :func:`check_config`), and
    ``ImportError`` on peft < 0.12 (use :func:`fedlora.inject` there).
    """
    peft = _peft()
    if not isinstance(lora_config, peft.LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    check_config(lora_config)
    cls = layer_class(method, **options)
    mapping: dict[type, type] = {nn.Linear: cls}
    try:
        from transformers.pytorch_utils import Conv1D

        mapping[Conv1D] = cls
    except ImportError:  # pragma: no cover - transformers is optional
        pass
    lora_config._register_custom_module(mapping)
    return lora_config


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return _base_classes()["lora" if name == "PeftLoRALinear" else "ravan"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------- state dicts
def _rescale_b(
    state: Mapping[str, torch.Tensor], global_rank: int | None, to_peft: bool
) -> dict[str, torch.Tensor]:
    out = dict(state)
    if global_rank is None:
        return out
    check_positive_int("global_rank", global_rank)
    for key, value in state.items():
        if not key.endswith(keys.B_SUFFIX):
            continue
        r = int(value.shape[1])
        factor = r / global_rank if to_peft else global_rank / r
        out[key] = value * factor
    return out


def to_peft_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    prefix: str = "base_model.model.",
    global_rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """A fedlora state dict (:func:`fedlora.get_adapter_state_dict`, an aggregation) as PEFT's.

    Adds ``prefix`` to every key (``"base_model.model."`` for a ``PeftModel``; ``""`` after
    ``inject_adapter_in_model``). With ``global_rank`` (fedlora's ``scale = alpha / R_global``)
    each ``lora_B.weight`` of rank ``r_k`` is multiplied by ``r_k / R_global``, so a PEFT layer
    of rank ``r_k`` (``scaling = alpha / r_k``) computes the same function.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    return {prefix + k: v for k, v in _rescale_b(state, global_rank, True).items()}


def from_peft_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    prefix: str = "base_model.model.",
    global_rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_peft_state_dict`: strip ``prefix`` (keys without it are kept as
    they are) and, with ``global_rank``, rescale ``lora_B.weight`` by ``R_global / r_k``."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    stripped = {k.removeprefix(prefix): v for k, v in state.items()}
    return _rescale_b(stripped, global_rank, False)
