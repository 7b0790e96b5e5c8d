"""Federated LoRA-family methods, one module per method, and the registry that finds them.

Each ``fedlora/methods/<name>.py`` defines ``METHOD = Method(...)`` (:mod:`fedlora.methods._protocol`):
its server rule, its client side and the flags callers need. :func:`get` and :func:`names` are the
only way code finds a method: every list of methods (aggregation, injection, the simulator, Flower,
PEFT, the CLI help) is derived from them. Adding a method is one new module plus one entry in
:data:`BUILTIN` (or a call to :func:`register` for a method defined outside the package).

Built-in methods: ``fedit``, ``ffa``, ``hetlora``, ``flexlora``, ``flora``, ``fedex`` (baselines),
``ravan``, ``hafl``, ``prelort``, ``florana``. They are imported on first use.
"""

from __future__ import annotations

import importlib

from fedlora.methods._common import ClientRejected
from fedlora.methods._protocol import (
    Budget,
    Client,
    ClientOptions,
    Method,
    Option,
    check_method,
    lora_upload_numel,
)

__all__ = [
    "BUILTIN",
    "Budget",
    "Client",
    "ClientOptions",
    "ClientRejected",
    "Method",
    "Option",
    "get",
    "lora_upload_numel",
    "names",
    "option_owners",
    "register",
]

BUILTIN = (
    "fedit",
    "ffa",
    "hetlora",
    "flexlora",
    "flora",
    "fedex",
    "ravan",
    "hafl",
    "prelort",
    "florana",
)
"""The built-in methods, in the order listings show them; each is ``fedlora.methods.<name>``."""

_REGISTRY: dict[str, Method] = {}
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for name in BUILTIN:
        module = importlib.import_module(f"fedlora.methods.{name}")
        method = getattr(module, "METHOD", None)
        if method is None:
            raise TypeError(f"fedlora.methods.{name} defines no METHOD = Method(...)")
        if method.name != name:
            raise ValueError(f"fedlora.methods.{name} registers the name {method.name!r}")
        _REGISTRY.setdefault(name, check_method(method))


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (checked against the protocol first) and return it.

    A name already registered raises ``ValueError`` unless ``replace=True``.
    """
    _load_builtins()
    check_method(method)
    if method.name in _REGISTRY and not replace:
        raise ValueError(
            f"a method named {method.name!r} is already registered (pass replace=True)"
        )
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method added with :func:`register` (built-ins cannot be removed)."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in method and cannot be unregistered")
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered method names: the built-ins in :data:`BUILTIN` order, then the others in
    registration order."""
    _load_builtins()
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` listing the known names otherwise."""
    _load_builtins()
    method = _REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"method must be one of {', '.join(_REGISTRY)}; got {name!r}")
    return method


def option_owners() -> dict[str, tuple[Option, tuple[str, ...]]]:
    """Every registered method option by name: its :class:`Option` (the first registered
    method's) and the names of the methods that take it, in registry order. The CLI derives its
    method flags from this, so a new method's options need no edit outside its module."""
    _load_builtins()
    out: dict[str, tuple[Option, tuple[str, ...]]] = {}
    for name, method in _REGISTRY.items():
        for opt in method.options:
            first, owners = out.get(opt.name, (opt, ()))
            out[opt.name] = (first, (*owners, name))
    return out
