"""The server side of every method on plain state dicts: :func:`aggregate` and :class:`Aggregator`.

Any FL framework (Flower, OpenFedLLM, FederatedScope, NVFlare) can call these with nothing but
PEFT-style state dicts (DESIGN §2): no model is needed.

What the dispatcher does before a method's rule runs (the rules in :mod:`fedlora.methods` receive
validated inputs and never see a bad client):

- ``global_state`` is checked (tensors, finite, every ``lora_A`` paired with its ``lora_B`` by
  module path, ranks consistent); bad global input raises ``ValueError``/``TypeError`` naming the
  key. Keys a previous round returned as instructions for the clients (``lora_merge_*``,
  ``lora_residual_*``) are ignored, so a returned state can be passed back as is.
- ``weights`` (e.g. the clients' numbers of examples) must be finite and non-negative, not all
  zero; they are normalised over the accepted clients.
- Each client is checked: a mapping of the global's keys (the method may allow some to be
  missing, e.g. FFA-LoRA's frozen ``A``), no extra keys, floating tensors of the right shapes (the
  method says whether client ranks must equal the global's, be a prefix, or be indexed), finite
  values, and the method's own meta checks. A client that fails is **rejected, not raised**:
  ``metrics["rejected"]`` names it (index, key, reason) and the others are aggregated
  (``strict=True`` raises instead). Client tensors are moved to the global's device and dtype.
- Nothing the caller passed is modified; the returned state shares no storage with the inputs.

``metrics`` always holds ``method``, ``clients_total``, ``clients_used``, ``used`` (indices),
``weights`` (normalised, per used client), ``rejected``, ``bytes_uploaded`` (tensor bytes of all
received states and metas) and ``aggregation_error`` (:mod:`fedlora.metrics`; NaN when not
computed), plus ``aggregation_error_per_layer`` and whatever the method reports.

A method is a :class:`fedlora.methods.Method` found through the registry
(:func:`fedlora.methods.get`): its ``aggregate`` rule, its rank policy (``ranks``: ``"equal"``,
``"prefix"``: client rank ``r_k ≤ R`` holding the leading components, ``"indexed"``: ``r_k ≤ R``
components placed by the meta), ``optional_suffixes`` (key suffixes a client may omit),
``indexed_suffixes`` (keys whose uploads may hold only some leading entries, placed by the meta:
Ravan's trained heads),
``linear`` (every uploaded element enters the result with a finite coefficient, so NaN/inf can
be detected on the result and traced back to the client only when present), ``check_client``
raising :class:`fedlora.methods._common.ClientRejected`, and ``stream_add`` / ``stream_result``
for :class:`Aggregator`. A rule must build its outputs from new tensors (never return a
client's tensor). A method that reports ``aggregation_error`` itself (Ravan) is trusted;
otherwise it is computed here from the LoRA factors.

Cost: validation and FedIT-style averaging take one multi-tensor pass per client: the default
call is the fast one (100 MiniLM-size clients: see ``bench/test_bench_aggregation.py``, several
times faster than Flower's own ``aggregate_arrayrecords``). The aggregation error is computed
only when asked for (``error=True``), exactly, in float64: per layer it needs the products of
all clients' stacked factors, ``min(m²(d_out + d_in), d_out·d_in·m)`` multiply-adds for a stack
of total rank ``m`` (the Gram form, or the dense ``[d_out, d_in]`` products when the stack is
wider than the layer), because ``‖Σ_k p_k B_k A_k‖`` couples every pair of clients. That is
negligible for tens of clients and about 0.1 s per round for 100 MiniLM-size clients on 2 CPU
cores. Ravan reports its error itself, in core space, at no extra cost.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.methods import Method
from fedlora.methods import get as get_method
from fedlora.methods import names as method_names
from fedlora.methods._common import (
    A_SUFFIX,
    B_SUFFIX,
    SERVER_SUFFIXES,
    ClientRejected,
    MaskedAccumulator,
    a_key,
    b_key,
    ideal_terms,
    lora_paths,
    normalised,
)
from fedlora.metrics import error_parts, relative_error

__all__ = ["Aggregator", "aggregate", "get_method"]  # METHODS, STREAMING_METHODS: __getattr__


def __getattr__(name: str) -> Any:
    # METHODS / STREAMING_METHODS are views of the registry, so a registered method shows up
    if name == "METHODS":
        return method_names()
    if name == "STREAMING_METHODS":
        return tuple(n for n in method_names() if get_method(n).streaming)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_options(method: str, fn: Any, options: Mapping[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for name in options:
        if name not in allowed:
            takes = ", ".join(allowed) if allowed else "no options"
            raise TypeError(f"unknown option {name!r} for method {method!r} (it takes: {takes})")


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def _nonfinite_key(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> str | None:
    """First of ``keys`` holding NaN/inf (one fused norm over all tensors on the common path)."""
    tensors = [state[k] for k in keys if state[k].numel()]
    if not tensors:
        return None
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
        return None
    for k in keys:
        if not bool(torch.isfinite(state[k]).all()):
            return k
    return None  # finite values whose norm overflowed (|x| >= ~2e19): nothing is wrong


#: device types whose tensors hold values the server can read
VALUE_DEVICES = ("cpu", "cuda")


def _check_global_layout(g: Mapping[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """The adapter tensors of the global state have their layout's rank: ``lora_A``/``lora_B``
    2-D (``[R, d_in]`` / ``[d_out, R]``), Ravan's ``lora_H`` 3-D ``[h, r, r]`` (square cores)
    and ``lora_s`` ``[h]``. A malformed global is the server's own error: a ``ValueError``
    naming ``global_state``, not every client rejected against it."""
    if key.endswith((A_SUFFIX, B_SUFFIX)) and value.dim() != 2:
        want = "[R, d_in]" if key.endswith(A_SUFFIX) else "[d_out, R]"
        raise ValueError(f"global_state[{key!r}] must be 2-D {want}, got shape {list(value.shape)}")
    if key.endswith(".lora_H") and (value.dim() != 3 or value.shape[1] != value.shape[2]):
        raise ValueError(
            f"global_state[{key!r}] must be [heads, r, r] (square cores), got shape "
            f"{list(value.shape)}"
        )
    if key.endswith(".lora_s"):
        H = g.get(key[: -len(".lora_s")] + ".lora_H")
        if value.dim() != 1 or (H is not None and H.dim() >= 1 and value.shape[0] != H.shape[0]):
            heads = H.shape[0] if H is not None and H.dim() >= 1 else "heads"
            raise ValueError(
                f"global_state[{key!r}] must be [{heads}] (one scale per head of its lora_H), "
                f"got shape {list(value.shape)}"
            )


def _check_global(global_state: Any) -> dict[str, torch.Tensor]:
    """Validated shallow copy of the global state without client-instruction keys."""
    if not isinstance(global_state, Mapping):
        raise TypeError(
            f"global_state must be a dict of str -> Tensor, got {type(global_state).__name__}"
        )
    g: dict[str, torch.Tensor] = {}
    for key, value in global_state.items():
        if not isinstance(key, str):
            raise TypeError(f"global_state keys must be str, got {key!r}")
        if key.endswith(SERVER_SUFFIXES):
            continue
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            what = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"global_state[{key!r}] must be a floating-point tensor, got {what}")
        if value.device.type not in VALUE_DEVICES:
            raise TypeError(
                f"global_state[{key!r}] is on the {value.device.type!r} device: aggregation "
                "reads values, so tensors must be on the CPU or a CUDA device (a 'meta' tensor "
                "has none)"
            )
        g[key] = value
    if not g:
        raise ValueError("global_state has no tensors")
    devices = {t.device for t in g.values()}
    if len(devices) > 1:
        raise ValueError(
            f"global_state must live on one device, got tensors on {sorted(map(str, devices))}"
        )
    for key in g:
        if key.endswith(A_SUFFIX) and key[: -len(A_SUFFIX)] + B_SUFFIX not in g:
            raise ValueError(f"global_state has {key!r} without its lora_B ({B_SUFFIX})")
        if key.endswith(B_SUFFIX) and key[: -len(B_SUFFIX)] + A_SUFFIX not in g:
            raise ValueError(f"global_state has {key!r} without its lora_A ({A_SUFFIX})")
    for key, value in g.items():
        _check_global_layout(g, key, value)
    for path in lora_paths(g):
        A, B = g[a_key(path)], g[b_key(path)]
        if A.dim() == 2 and (B.dim() != 2 or B.shape[1] != A.shape[0]):
            raise ValueError(
                f"global_state[{b_key(path)!r}] must be [d_out, R={A.shape[0]}] to pair with "
                f"lora_A {list(A.shape)}, got {list(B.shape)}"
            )
    bad = _nonfinite_key(g, list(g))
    if bad is not None:
        raise ValueError(f"global_state[{bad!r}] contains NaN/inf")
    return g


def _check_weights(weights: Any, n: int) -> list[float]:
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"weights must be 1-D [C={n}], got shape {list(weights.shape)}")
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(
            f"weights must be a sequence of C={n} numbers, got {type(weights).__name__}"
        )
    if len(weights) != n:
        raise ValueError(f"weights must have one entry per client (C={n}), got {len(weights)}")
    out = []
    for k, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"weights[{k}] must be a number, got {w!r}")
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{k}] must be finite and non-negative, got {w}")
        out.append(float(w))
    if n and not any(out):
        raise ValueError("weights are all zero: no client can contribute")
    return out


def _check_weight(weight: Any) -> float:
    if isinstance(weight, torch.Tensor) and weight.numel() == 1:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"weight must be a number, got {weight!r}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be finite and non-negative, got {weight}")
    return float(weight)


def _check_metas(metas: Any, n: int) -> list[Any]:
    if metas is None:
        return [{} for _ in range(n)]
    if isinstance(metas, (str, bytes, Mapping)) or not isinstance(metas, Sequence):
        raise TypeError(
            f"metas must be a list of C={n} dicts (or None), got {type(metas).__name__}"
        )
    if len(metas) != n:
        raise ValueError(f"metas must have one entry per client (C={n}), got {len(metas)}")
    return [{} if m is None else m for m in metas]


def _check_client(
    state: Any,
    meta: Any,
    g: Mapping[str, torch.Tensor],
    impl: Method,
    *,
    finite: bool = True,
    sig: tuple | None = None,
    fast: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Validated copy of one client's state on the global's device and dtypes, or
    :class:`ClientRejected` naming the first problem. ``finite=False`` leaves the NaN/inf check
    to the caller (see :func:`aggregate`); ``fast`` is the result of :func:`_fast_clean` when the
    caller already has it, ``sig`` the global's signature for computing it."""
    if not isinstance(state, Mapping):
        raise ClientRejected(
            None, f"state must be a dict of str -> Tensor, got {type(state).__name__}"
        )
    if not isinstance(meta, Mapping):
        raise ClientRejected(None, f"meta must be a dict, got {type(meta).__name__}")
    extra = state.keys() - g.keys()
    if extra:
        key = next(k for k in state if k in extra)
        raise ClientRejected(str(key), "unexpected key (not in the global state)")
    if len(state) != len(g):
        optional = impl.optional_suffixes
        for key in g:
            if key not in state and not (optional and key.endswith(optional)):
                raise ClientRejected(key, "missing key")
    policy = impl.ranks
    clean = fast if fast is not None else _fast_clean(state, sig)
    if clean is None:
        clean = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                what = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise ClientRejected(key, f"must be a floating-point tensor, got {what}")
            if value.device.type not in VALUE_DEVICES:
                raise ClientRejected(
                    key, f"on the {value.device.type!r} device (no readable values)"
                )
            ref = g[key]
            if (
                value.shape != ref.shape
                and not (
                    policy != "equal" and ref.dim() == 2 and key.endswith((A_SUFFIX, B_SUFFIX))
                )
                and not _indexed_rows(impl, key, value, ref)
            ):
                raise ClientRejected(key, f"shape {list(value.shape)} != global {list(ref.shape)}")
            if value.dtype != ref.dtype or value.device != ref.device:
                value = value.to(device=ref.device, dtype=ref.dtype)
            clean[key] = value
    if policy != "equal":
        for path in lora_paths(g):
            A, B = clean.get(a_key(path)), clean.get(b_key(path))
            A_g = g[a_key(path)]
            if A is None or B is None or A_g.dim() != 2:
                continue
            full, d_in = A_g.shape
            d_out = g[b_key(path)].shape[0]
            if A.dim() != 2 or A.shape[1] != d_in or not 1 <= A.shape[0] <= full:
                raise ClientRejected(
                    a_key(path), f"shape {list(A.shape)} is not [r_k <= {full}, d_in={d_in}]"
                )
            if B.dim() != 2 or list(B.shape) != [d_out, A.shape[0]]:
                raise ClientRejected(
                    b_key(path),
                    f"shape {list(B.shape)} is not [d_out={d_out}, r_k={A.shape[0]}] "
                    "(the rank of its lora_A)",
                )
    if finite:
        _check_finite(clean)
    if impl.check_client is not None:
        impl.check_client(g, clean, meta)
    return clean


def _indexed_rows(impl: Method, key: str, value: torch.Tensor, ref: torch.Tensor) -> bool:
    """``value`` is a compact upload of some of ``ref``'s leading entries (``[K, ...]``,
    ``1 ≤ K ≤ n`` for ``ref`` ``[n, ...]``) under a key the method declares in
    ``indexed_suffixes``; its ``check_client`` validates where they go (Ravan's trained heads)."""
    suffixes = impl.indexed_suffixes
    return (
        bool(suffixes)
        and key.endswith(suffixes)
        and value.dim() == ref.dim() >= 1
        and value.shape[1:] == ref.shape[1:]
        and 1 <= value.shape[0] <= ref.shape[0]
    )


def _signature(g: Mapping[str, torch.Tensor]) -> tuple[list[str], list[torch.Size], Any] | None:
    """Keys, shapes and the single (dtype, device) of the global, for :func:`_fast_clean`; None
    when the global mixes dtypes or devices."""
    kinds = {(t.dtype, t.device) for t in g.values()}
    if len(kinds) != 1:
        return None
    return list(g), [t.shape for t in g.values()], next(iter(kinds))


def _fast_clean(state: Mapping[str, Any], sig: tuple | None) -> dict | None:
    """The common case in one sweep: the client sends the global's keys in the global's order,
    all floating tensors of the global's shapes, dtype and device. None when anything differs
    (the per-key checks then find and name it)."""
    if sig is None or list(state) != sig[0]:
        return None
    values = list(state.values())
    if not all(isinstance(v, torch.Tensor) for v in values):
        return None
    if [v.shape for v in values] != sig[1]:
        return None
    if {(v.dtype, v.device) for v in values} != {sig[2]} or not values[0].is_floating_point():
        return None
    return dict(state)


def _check_finite(state: Mapping[str, torch.Tensor]) -> None:
    bad = _nonfinite_key(state, list(state))
    if bad is not None:
        raise ClientRejected(bad, "contains NaN/inf")


def _payload_bytes(obj: Any) -> int:
    """Bytes of the tensors in a state or meta (nested dicts/lists; numbers count 8 bytes)."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, Mapping):
        values = obj.values()
    elif isinstance(obj, (list, tuple)):
        values = obj
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return 8
    else:
        return 0
    return sum(v.nbytes if isinstance(v, torch.Tensor) else _payload_bytes(v) for v in values)


def _own_storage(
    new_state: dict[str, torch.Tensor], global_state: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Clone every output tensor that shares storage with a tensor of the caller's global state
    (rules build their outputs from new tensors and never return a client's tensor, which the
    tests check for every method)."""
    storages = {
        t.untyped_storage().data_ptr()
        for t in global_state.values()
        if isinstance(t, torch.Tensor) and t.numel()
    }
    return {
        k: (v.clone() if v.numel() and v.untyped_storage().data_ptr() in storages else v)
        for k, v in new_state.items()
    }


# ------------------------------------------------------------------------------------------------
# aggregation error
# ------------------------------------------------------------------------------------------------


# below this relative error a float32 evaluation may be dominated by its own rounding
# (eps32·sqrt(m) / error); the error is then recomputed in float64
_FLOAT32_ERROR_FLOOR = 1e-2


def _generic_error(
    g: Mapping[str, torch.Tensor],
    new_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> tuple[float, dict[str, float]]:
    """Model-wide and per-layer relative error of the 2-D LoRA layers, from factors.

    Evaluated in float32 first (half the cost of float64 products); when the model-wide error
    is below :data:`_FLOAT32_ERROR_FLOOR`, where float32 rounding could matter (exact rules
    report about 0), everything is recomputed in float64. Reported values are accurate to
    better than 1e-3 relative either way.
    """
    err, per_layer = _layer_errors(g, new_state, client_states, weights, torch.float32)
    if not (math.isfinite(err) and err >= _FLOAT32_ERROR_FLOOR):  # small, NaN, overflow
        err, per_layer = _layer_errors(g, new_state, client_states, weights, torch.float64)
    return err, per_layer


def _layer_errors(
    g: Mapping[str, torch.Tensor],
    new_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    dtype: torch.dtype,
) -> tuple[float, dict[str, float]]:
    diff_total = ideal_total = 0.0
    per_layer: dict[str, float] = {}
    for path in lora_paths(g):
        if g[a_key(path)].dim() != 2 or b_key(path) not in new_state:
            continue
        ideal = ideal_terms(client_states, weights, path, g)
        glob = [(new_state[b_key(path)], new_state[a_key(path)], 1.0)]
        for b_name, a_name in (
            ("lora_merge_B", "lora_merge_A"),
            ("lora_residual_B", "lora_residual_A"),
        ):
            if f"{path}.{b_name}" in new_state:
                glob.append((new_state[f"{path}.{b_name}"], new_state[f"{path}.{a_name}"], 1.0))
        diff, ref = error_parts(ideal, glob, dtype=dtype)
        per_layer[path] = relative_error(diff, ref)
        diff_total += diff
        ideal_total += ref
    if not per_layer:
        return math.nan, per_layer
    return relative_error(diff_total, ideal_total), per_layer


def _error_state(
    impl: Method, g: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], meta: Any
) -> Mapping[str, torch.Tensor]:
    """The client's whole adapter for the error: methods whose uploads may hold only some
    components (HAFL) fill in the rest with ``error_state``; others upload it whole."""
    fill = impl.error_state
    return fill(g, state, meta or {}) if fill is not None else state


def _isolate(
    impl: Method,
    g: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    metas: Sequence[Any],
    options: Mapping[str, Any],
) -> set[int] | None:
    """Indices of the clients on which the rule raises when run alone (the safety net that
    keeps one client the validation missed from losing the round); None when every client
    fails alone, i.e. the fault is not a client's."""
    bad = set()
    for i, (state, meta) in enumerate(zip(states, metas, strict=True)):
        try:
            impl.aggregate(dict(g), [state], [1.0], [meta], **options)
        except Exception:
            bad.add(i)
    return None if len(bad) == len(states) else bad


def _unchanged(g: Mapping[str, torch.Tensor], why: str) -> dict[str, torch.Tensor]:
    warnings.warn(
        f"no client update was aggregated ({why}); the global state is unchanged", stacklevel=3
    )
    return {k: v.clone() for k, v in g.items()}


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------


def _empty_metrics(
    method: str, n: int, rejected: list[dict[str, Any]], nbytes: int
) -> dict[str, Any]:
    """The metrics of a round before (or without) a result."""
    return {
        "method": method,
        "clients_total": n,
        "clients_used": 0,
        "used": [],
        "weights": [],
        "rejected": rejected,
        "bytes_uploaded": nbytes,
        "aggregation_error": math.nan,
        "aggregation_error_per_layer": {},
    }


class _Round:
    """The clients of one :func:`aggregate` call: which are accepted (``used``, their validated
    ``states``) and which were rejected, and the rule run over the accepted ones."""

    def __init__(
        self,
        method: str,
        impl: Method,
        g: dict[str, torch.Tensor],
        weights: list[float],
        metas: list[Any],
        options: Mapping[str, Any],
        strict: bool,
    ) -> None:
        self.method, self.impl, self.g = method, impl, g
        self.weights, self.metas, self.options, self.strict = weights, metas, options, strict
        self.used: list[int] = []
        self.states: list[dict[str, torch.Tensor]] = []
        self.rejected: list[dict[str, Any]] = []

    def reject(self, k: int, exc: ClientRejected) -> None:
        if self.strict:
            raise ValueError(f"client_states[{k}] rejected: {exc}") from None
        self.rejected.append({"client": k, "key": exc.key, "reason": exc.reason})
        self.rejected.sort(key=lambda r: r["client"])

    def validate(self, client_states: Sequence[Any]) -> int:
        """Check every client; returns the bytes received.

        Linear rules add every uploaded element into the result with a finite coefficient, so
        a NaN/inf anywhere makes the result non-finite: their clients' values are checked once,
        on the result, and per client only when that check fails (the common case costs one
        pass fewer over all uploads). Zero-weight clients are always checked up front.
        """
        sig = _signature(self.g)
        sig_bytes = sum(t.nbytes for t in self.g.values())
        nbytes = sum(_payload_bytes(m) for m in self.metas)
        for k, (state, meta) in enumerate(zip(client_states, self.metas, strict=True)):
            fast = _fast_clean(state, sig) if isinstance(state, Mapping) else None
            nbytes += sig_bytes if fast is not None else _payload_bytes(state)
            finite = not self.impl.linear or self.weights[k] == 0
            try:
                self.states.append(
                    _check_client(state, meta, self.g, self.impl, finite=finite, fast=fast)
                )
                self.used.append(k)
            except ClientRejected as exc:
                self.reject(k, exc)
        return nbytes

    def run(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[float]] | None:
        """``(new_state, extra, p)`` of the rule over the accepted clients, or None when none
        has a positive weight."""
        if not any(self.weights[k] > 0 for k in self.used):
            return None
        p = normalised([self.weights[k] for k in self.used])
        metas = [self.metas[k] for k in self.used]
        out, extra = self.impl.aggregate(dict(self.g), self.states, p, metas, **self.options)
        return dict(out), extra, p

    def run_guarded(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[float]] | None:
        """:meth:`run`, with the safety net behind validation: when the rule raises, the
        clients it raises on alone are rejected and the rule runs over the others."""
        try:
            return self.run()
        except Exception as exc:
            if self.strict:
                raise
            metas = [self.metas[k] for k in self.used]
            culprits = _isolate(self.impl, self.g, self.states, metas, self.options)
            if culprits is None:  # every client alone fails too: not a client's fault
                raise
            why = f"the {self.method!r} rule failed on it: {exc!r:.200}"
            for i in sorted(culprits):
                self.reject(self.used[i], ClientRejected(None, why))
            self._keep([i for i in range(len(self.used)) if i not in culprits])
            return self.run()

    def drop_nonfinite(self) -> None:
        """Reject the accepted clients holding NaN/inf (the deferred check of linear rules)."""
        keep = []
        for i, (k, state) in enumerate(zip(self.used, self.states, strict=True)):
            try:
                _check_finite(state)
                keep.append(i)
            except ClientRejected as exc:
                self.reject(k, exc)
        self._keep(keep)

    def _keep(self, indices: list[int]) -> None:
        self.used = [self.used[i] for i in indices]
        self.states = [self.states[i] for i in indices]


def aggregate(
    method: str,
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor,
    metas: Sequence[Mapping[str, Any] | None] | None = None,
    *,
    error: bool = False,
    strict: bool = False,
    **options: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Aggregate one round of client updates with ``method``'s server rule.

    Args:
        method: a registered method name (:func:`fedlora.methods.names`: ``"fedit"``,
            ``"ffa"``, ``"hetlora"``, ``"flexlora"``, ``"flora"``, ``"fedex"``, ``"ravan"``,
            ``"hafl"``, ``"prelort"``, ``"florana"``).
        global_state: the state the clients started from (PEFT-style keys, DESIGN §2).
        client_states: one uploaded state per client.
        weights: one non-negative weight per client (default convention: its number of training
            examples); normalised over the accepted clients.
        metas: one dict per client with what the method reads (see each method's docstring,
            e.g. ``{"rank": r_k}`` for HetLoRA/PreLort/FlexLoRA, ``{"updated": ..., "indices":
            ..., "scores": ...}`` for HAFL, ``{"heads": ...}`` for Ravan); None for none.
        error: also compute the aggregation error ``‖ΔW_ideal − ΔW_global‖ / ‖ΔW_ideal‖``
            (exact, float64; costs products of the stacked factors of all clients, see the
            module docstring); off by default so the server's hot path stays fast, and then
            reported as NaN.
        strict: raise ``ValueError`` on the first rejected client instead of skipping it.
        **options: method options (e.g. ``weighting="data"`` for HetLoRA, ``shared=True`` for
            FLoRA-NA, ``seed=`` for FLoRA, ``prev_scores=`` for HAFL).

    Returns:
        ``(new_global_state, metrics)``; see the module docstring for the metrics keys. When no
        client is usable the global state is returned unchanged (a copy) with a warning.
    """
    impl = get_method(method)
    _check_options(method, impl.aggregate, options)
    g = _check_global(global_state)
    if isinstance(client_states, Mapping) or not isinstance(client_states, Sequence):
        raise TypeError(
            f"client_states must be a list of state dicts, got {type(client_states).__name__}"
        )
    n = len(client_states)
    w_all = _check_weights(weights, n)
    metas_all = _check_metas(metas, n)

    rnd = _Round(method, impl, g, w_all, metas_all, options, strict)
    nbytes = rnd.validate(client_states)
    metrics = _empty_metrics(method, n, rnd.rejected, nbytes)
    result = rnd.run_guarded()
    if (
        impl.linear
        and result is not None
        and _nonfinite_key(result[0], list(result[0])) is not None
    ):
        rnd.drop_nonfinite()
        result = rnd.run()
    if result is None:
        why = "every client was rejected" if not rnd.used else "the accepted clients' weights are 0"
        return _unchanged(g, why), metrics
    used, clean_states = rnd.used, rnd.states
    new_state, extra, p = result
    new_state = _own_storage(new_state, global_state)
    metrics.update(clients_used=len(used), used=used, weights=p)
    if "aggregation_error" in extra:
        metrics["aggregation_error"] = float(extra.pop("aggregation_error"))
    elif error:
        whole = [
            _error_state(impl, g, st, metas_all[k])
            for k, st in zip(used, clean_states, strict=True)
        ]
        metrics["aggregation_error"], metrics["aggregation_error_per_layer"] = _generic_error(
            g, new_state, whole, p
        )
    metrics.update(extra)
    return new_state, metrics


class Aggregator:
    """Streaming aggregation: ``add`` clients one at a time, then ``result()``.

    For the methods whose rule is an exact running sum (``Method.streaming``: fedit, ffa,
    hetlora, prelort, hafl) the result equals :func:`aggregate` on the same clients (up to float
    rounding of the sums), while only the running sums are held in memory, never the clients.
    Validation and rejection are those of :func:`aggregate`: a rejected client is reported in
    the metrics (``add`` returns False) or raises with ``strict=True``.

    ``error=True`` also computes the aggregation error, which needs every client's LoRA factors
    at the end (its ideal norm couples all pairs of clients): they are then kept, which costs the
    memory streaming otherwise saves. By default it is off and reported as NaN.

    The global state is copied at construction, so the caller may reuse its dict meanwhile.
    """

    def __init__(
        self,
        method: str,
        global_state: Mapping[str, torch.Tensor],
        *,
        error: bool = False,
        strict: bool = False,
        **options: Any,
    ) -> None:
        self.method = method
        self._impl = get_method(method)
        if not self._impl.streaming:
            streaming = [n for n in method_names() if get_method(n).streaming]
            raise ValueError(
                f"method {method!r} cannot stream (its rule needs every client at once); use "
                f"fedlora.aggregate, or one of {tuple(streaming)}"
            )
        _check_options(method, self._impl.aggregate, options)
        self._g = {k: v.clone() for k, v in _check_global(global_state).items()}
        self._sig = _signature(self._g)
        self._options = options
        self._error = bool(error)
        self._strict = bool(strict)
        self._acc = MaskedAccumulator(self._g)
        self._count = 0
        self._used: list[int] = []
        self._weights: list[float] = []
        self._rejected: list[dict[str, Any]] = []
        self._bytes = 0
        self._kept: list[dict[str, torch.Tensor]] = []

    def add(
        self,
        state: Mapping[str, torch.Tensor],
        weight: float,
        meta: Mapping[str, Any] | None = None,
    ) -> bool:
        """Add one client's update; returns False if it was rejected (see ``result()[1]``)."""
        w = _check_weight(weight)
        k = self._count
        self._count += 1
        meta = {} if meta is None else meta
        self._bytes += _payload_bytes(state) + _payload_bytes(meta)
        try:
            clean = _check_client(state, meta, self._g, self._impl, sig=self._sig)
        except ClientRejected as exc:
            if self._strict:
                raise ValueError(f"client {k} rejected: {exc}") from None
            self._rejected.append({"client": k, "key": exc.key, "reason": exc.reason})
            return False
        self._impl.stream_add(self._acc, clean, w, meta, **self._options)
        self._used.append(k)
        self._weights.append(w)
        if self._error:
            whole = _error_state(self._impl, self._g, clean, meta)
            self._kept.append(
                {key: t.clone() for key, t in whole.items() if key.endswith((A_SUFFIX, B_SUFFIX))}
            )
        return True

    def result(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(new_global_state, metrics)`` for the clients added so far (same keys as
        :func:`aggregate`'s metrics)."""
        metrics = _empty_metrics(self.method, self._count, list(self._rejected), self._bytes)
        if not self._used or not any(w > 0 for w in self._weights):
            why = "no client was accepted" if not self._used else "the accepted weights are 0"
            return _unchanged(self._g, why), metrics
        new_state, extra = self._impl.stream_result(self._acc, **self._options)
        new_state = _own_storage(dict(new_state), self._g)
        p = normalised(self._weights)
        metrics.update(clients_used=len(self._used), used=list(self._used), weights=p)
        if self._error:
            metrics["aggregation_error"], metrics["aggregation_error_per_layer"] = _generic_error(
                self._g, new_state, self._kept, p
            )
        metrics.update(extra)
        return new_state, metrics
