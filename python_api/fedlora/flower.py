"""Flower integration: a Message-API strategy that aggregates with :func:`fedlora.aggregate`.

Server side::

    from fedlora.flower import FedLoRAStrategy, to_arrayrecord
    strategy = FedLoRAStrategy("hetlora", budgets={node_id: {"rank": 4}, ...}, fraction_evaluate=0)
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(global_state), num_rounds=5)

Client side (inside ``@app.train()``)::

    state = from_arrayrecord(msg.content["arrays"])          # this client's payload
    rank = msg.content["config"].get("rank")                 # its budget, if the server set one
    ... load, train, upload ...
    return train_reply(msg, upload_state, num_examples=n, meta={"rank": rank})

What travels where (DESIGN §2 state dicts, Flower records):

- arrays: one ``ArrayRecord`` (key ``"arrays"``) of PEFT-style keys; tensors are exported as
  float32 (numpy and Flower cannot carry bfloat16).
- weight: the reply's ``MetricRecord`` entry ``weighted_by_key`` (``"num-examples"``).
- per-client metadata (rank, heads trained, HAFL's updated components and scores, ...): a
  ``ConfigRecord`` named :data:`META_KEY` in the reply; values a ConfigRecord cannot hold
  (nested dicts, lists of lists) are JSON-encoded (see :func:`encode_meta`).
- per-client budgets from the server: ``configure_train`` sends each node its own payload (a
  rank-``r_k`` prefix, FlexLoRA's rank-``r_k`` factors or anything ``payload_fn`` returns) and
  its budget entries (``rank``, ``heads``, ``components``, ...) in the train ``ConfigRecord``.

A reply that is an error, is malformed (no or several ArrayRecords, no weight, undecodable meta)
or that :func:`fedlora.aggregate` rejects (unexpected keys, wrong shapes, NaN/inf) is left out of
the round and reported in the returned ``MetricRecord`` (``rejected``: node ids,
``num_rejected``); the reasons are logged and kept in :attr:`FedLoRAStrategy.last_rejections`.
Nothing a client sends can stop the server loop. The global state is kept on the strategy
across rounds (``global_state``).

``flwr`` is imported lazily: this module imports without it, and the Flower classes
(:class:`FedLoRAStrategy`, :class:`FedLoRALegacyStrategy`, :class:`LocalGrid`) are built on first
access. The legacy adapter serves pre-Message-API apps (``aggregate_fit`` over NDArrays in a fixed
key order, see :func:`state_to_ndarrays`).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

# built on first access (they subclass flwr classes): see __getattr__ at the end
_LAZY = ("FedLoRAStrategy", "FedLoRALegacyStrategy", "LocalGrid")

__all__ = [
    *_LAZY,
    "META_KEY",
    "RoundResult",
    "aggregate_round",
    "decode_meta",
    "encode_meta",
    "from_arrayrecord",
    "meta_record",
    "ndarrays_to_state",
    "state_to_ndarrays",
    "to_arrayrecord",
    "to_float32",
    "train_reply",
]

logger = logging.getLogger(__name__)

#: Name of the ``ConfigRecord`` that carries a client's metadata in its train reply.
META_KEY = "fedlora-meta"
#: Entry of an encoded meta listing the keys whose values are JSON strings.
_JSON_KEYS = "fedlora.json-keys"
#: Budget entries a server may send to a client (ConfigRecord scalars).
BUDGET_KEYS = ("rank", "heads", "components", "steps")


def _flwr_error() -> ImportError:
    return ImportError(
        "fedlora.flower needs Flower >= 1.21 (Message API): `pip install 'fedlora-kernels[flower]'` "
        "(or `pip install 'flwr>=1.21'`)"
    )


# ------------------------------------------------------------------------------------- codecs
def to_float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies; floating tensors (bf16, fp16, fp64) become float32."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of str -> Tensor, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state keys must be str, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        t = value.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        out[key] = t.contiguous().clone()
    return out


def _config_value_ok(value: Any) -> bool:
    scalar = (bool, int, float, str, bytes)
    if isinstance(value, scalar):
        return not isinstance(value, int) or isinstance(value, bool) or abs(value) < 2**63
    if isinstance(value, list) and value:
        kinds = {type(v) for v in value}
        return len(kinds) == 1 and kinds.pop() in scalar
    return False


def encode_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """A client meta as ``ConfigRecord`` content: scalars and flat lists stay as they are; other
    values (nested dicts/lists, tensors, None) are JSON-encoded and their keys listed under
    ``"fedlora.json-keys"``. Inverse: :func:`decode_meta`."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    out: dict[str, Any] = {}
    encoded: list[str] = []
    for key, value in meta.items():
        if not isinstance(key, str) or key == _JSON_KEYS:
            raise ValueError(f"meta keys must be str other than {_JSON_KEYS!r}, got {key!r}")
        if _config_value_ok(value):
            out[key] = value
        else:
            out[key] = json.dumps(_jsonable(value), sort_keys=True)
            encoded.append(key)
    if encoded:
        out[_JSON_KEYS] = encoded
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"meta value of type {type(value).__name__} cannot be JSON-encoded")


def decode_meta(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """Inverse of :func:`encode_meta` (``ValueError`` for a malformed JSON entry)."""
    if record is None:
        return {}
    out = dict(record.items())
    encoded = out.pop(_JSON_KEYS, [])
    if isinstance(encoded, str):
        encoded = [encoded]
    for key in encoded:
        if key not in out or not isinstance(out[key], str):
            raise ValueError(f"meta entry {key!r} is listed as JSON but holds no JSON string")
        try:
            out[key] = json.loads(out[key])
        except json.JSONDecodeError as e:
            raise ValueError(f"meta entry {key!r} is not valid JSON: {e}") from None
    return out


def state_to_ndarrays(
    state: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None
) -> list[np.ndarray]:
    """The values of ``state`` as float32 numpy arrays in the order of ``keys`` (default: the
    dict's order); the legacy Flower API carries parameters as such a positional list."""
    keys = list(state) if keys is None else list(keys)
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"state has no entries for keys {missing[:5]}")
    flat = to_float32({k: state[k] for k in keys})
    return [flat[k].numpy() for k in keys]


def ndarrays_to_state(arrays: Sequence[np.ndarray], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_to_ndarrays` (``ValueError`` when the counts differ)."""
    arrays = list(arrays)
    if len(arrays) != len(keys):
        raise ValueError(f"got {len(arrays)} arrays for {len(keys)} keys; the key order must match")
    out = {}
    for k, a in zip(keys, arrays, strict=True):
        t = torch.from_numpy(np.array(a, copy=True))
        out[k] = t.float() if t.is_floating_point() else t
    return out


# ------------------------------------------------------------------------------------- round core
class RoundResult:
    """What :func:`aggregate_round` returns.

    Attributes:
        state: the new global state, or None when the round changed nothing (every client
            rejected, or the aggregation failed).
        metrics: ``fedlora.aggregate``'s metrics (empty when it was not called).
        rejected: ``[(client id, reason)]`` for every client left out, at any stage.
        error: why the whole round failed, or None.
    """

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None
        self.metrics: dict[str, Any] = {}
        self.rejected: list[tuple[Any, str]] = []
        self.error: str | None = None
        self.ids: list[Any] = []
        self.num_clients = 0

    def scalar_metrics(self) -> dict[str, int | float | list[int] | list[float]]:
        """The numeric part of the metrics, as a Flower ``MetricRecord`` can hold it.

        ``used`` and ``rejected`` hold client ids (Flower node ids), ``num_rejected`` counts
        the rejected clients, ``aggregation_failed`` is 1 when the round changed nothing.
        """
        out: dict[str, Any] = {}
        for key, value in self.metrics.items():
            if key in ("used", "rejected") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                out[key] = value
            elif isinstance(value, list) and value and _numbers(value):
                floats = any(isinstance(v, float) for v in value)
                out[key] = [float(v) for v in value] if floats else list(value)
        used = [self.ids[k] for k in self.metrics.get("used", []) if 0 <= k < len(self.ids)]
        rejected = [c for c, _ in self.rejected]
        for key, ids in (("used", used), ("rejected", rejected)):
            ids = [c for c in ids if c is not None]  # a reply with no sender is only counted
            if all(isinstance(c, int) and not isinstance(c, bool) for c in ids):
                out[key] = ids
        out["clients_total"] = self.num_clients
        out["clients_used"] = len(used)
        out["num_rejected"] = len(rejected)
        out["aggregation_failed"] = int(self.state is None)
        return out


def _numbers(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def aggregate_round(
    method: str,
    global_state: Mapping[str, torch.Tensor],
    clients: Sequence[tuple[Any, Mapping[str, torch.Tensor] | None, float | None, Any, str | None]],
    *,
    aggregate_fn: Callable[..., tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
    options: Mapping[str, Any] | None = None,
) -> RoundResult:
    """One server round on already-decoded client uploads; never raises for client input.

    ``clients``: ``(client id, state, weight, meta, reason)`` per reply; a non-None ``reason``
    means the framework layer already rejected it (error reply, malformed record). The others go
    to ``aggregate_fn`` (default :func:`fedlora.aggregate`), whose own rejections (keys, shapes,
    NaN/inf, meta) are mapped back to client ids. An exception of ``aggregate_fn`` (e.g. a bad
    global state) fails the round: ``state`` is None and ``error`` says why.
    """
    if aggregate_fn is None:
        from fedlora.aggregation import aggregate as aggregate_fn
    result = RoundResult()
    result.num_clients = len(clients)
    ids, states, weights, metas = [], [], [], []
    for cid, state, weight, meta, reason in clients:
        if reason is not None:
            result.rejected.append((cid, reason))
            continue
        ids.append(cid)
        result.ids.append(cid)
        states.append(state)
        weights.append(weight)
        metas.append(meta)
    if not ids:
        result.error = "no usable client reply"
        return result
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "global state unchanged" is reported below
            new_state, metrics = aggregate_fn(
                method, global_state, states, weights, metas, **dict(options or {})
            )
    except Exception as e:  # a failed round must not stop the server loop
        result.error = f"{type(e).__name__}: {e}"
        logger.error("fedlora aggregation failed, global state unchanged: %s", result.error)
        return result
    result.metrics = dict(metrics)
    for entry in metrics.get("rejected", []) or []:
        k = entry.get("client") if isinstance(entry, Mapping) else entry
        key = entry.get("key") if isinstance(entry, Mapping) else None
        why = entry.get("reason", "rejected") if isinstance(entry, Mapping) else "rejected"
        cid = ids[k] if isinstance(k, int) and 0 <= k < len(ids) else k
        result.rejected.append((cid, f"{key}: {why}" if key else str(why)))
    if metrics.get("clients_used", len(ids)) == 0:
        result.error = "every client update was rejected"
        return result
    result.state = dict(new_state)
    return result


def _weight_of(value: Any) -> tuple[float | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"weight must be a number, got {value!r}"
    if not math.isfinite(value) or value < 0:
        return None, f"weight must be finite and non-negative, got {value}"
    return float(value), None


# ------------------------------------------------------------------------------------- flwr helpers
def to_arrayrecord(state: Any, *, dtype: torch.dtype = torch.float32) -> Any:
    """A state dict (or a model with fedlora adapter layers) as a Flower ``ArrayRecord``.

    Floating tensors are cast to ``dtype`` (float32 by default: Flower serialises with numpy,
    which has no bfloat16). A model is read with :func:`fedlora.get_adapter_state_dict`.
    """
    try:
        from flwr.app import ArrayRecord
    except ImportError as e:
        raise _flwr_error() from e
    if isinstance(state, torch.nn.Module):
        from fedlora.state_dict import get_adapter_state_dict

        state = get_adapter_state_dict(state)
    if dtype not in (torch.float32, torch.float16, torch.float64):
        raise ValueError(f"dtype must be a numpy-compatible float dtype, got {dtype}")
    flat = {k: v.to(dtype) if v.is_floating_point() else v for k, v in to_float32(state).items()}
    return ArrayRecord(flat)


def from_arrayrecord(record: Any) -> dict[str, torch.Tensor]:
    """A Flower ``ArrayRecord`` as a flat ``dict[str, Tensor]`` (floating tensors in float32)."""
    try:
        from flwr.app import ArrayRecord
    except ImportError as e:
        raise _flwr_error() from e
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"record must be a flwr ArrayRecord, got {type(record).__name__}")
    return to_float32(dict(record.to_torch_state_dict()))


def meta_record(meta: Mapping[str, Any] | None) -> Any:
    """A client meta as the ``ConfigRecord`` a train reply carries under :data:`META_KEY`."""
    try:
        from flwr.app import ConfigRecord
    except ImportError as e:
        raise _flwr_error() from e
    return ConfigRecord(encode_meta(meta))


def train_reply(
    msg: Any,
    state: Any,
    num_examples: int | float,
    *,
    meta: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str = "arrays",
) -> Any:
    """The reply a ClientApp returns from ``@app.train()``: the uploaded state (float32 arrays),
    a ``MetricRecord`` with ``weighted_by_key`` and ``metrics``, and ``meta`` as a ConfigRecord."""
    try:
        from flwr.app import Message, MetricRecord, RecordDict
    except ImportError as e:
        raise _flwr_error() from e
    _, why = _weight_of(num_examples)
    if why is not None:
        raise ValueError(f"num_examples: {why}")
    record = {weighted_by_key: num_examples, **dict(metrics or {})}
    content = RecordDict(
        {
            arrayrecord_key: to_arrayrecord(state),
            "metrics": MetricRecord(record),
            META_KEY: meta_record(meta),
        }
    )
    return Message(content=content, reply_to=msg)


def _node_id(msg: Any) -> int | None:
    """The sender's node id of a reply, or None when ``msg`` is not a Message (e.g. None)."""
    try:
        nid = msg.metadata.src_node_id
    except AttributeError:
        return None
    return int(nid) if isinstance(nid, int) and not isinstance(nid, bool) else None


def _decode_reply(msg: Any, weighted_by_key: str, arrayrecord_key: str, meta_key: str) -> tuple:
    """``(state, weight, meta, reason)`` of one reply; ``reason`` is None when it is usable."""
    if msg.has_error():
        return None, None, None, f"error reply: {msg.error.reason}"
    try:
        content = msg.content
        arrays = content.array_records
        if arrayrecord_key in arrays:
            record = arrays[arrayrecord_key]
        elif len(arrays) == 1:
            record = next(iter(arrays.values()))
        else:
            return None, None, None, f"expected one ArrayRecord, got {len(arrays)}"
        weight = None
        for metric_record in content.metric_records.values():
            if weighted_by_key in metric_record:
                weight = metric_record[weighted_by_key]
                break
        else:
            return None, None, None, f"no {weighted_by_key!r} in the reply's MetricRecord"
        weight, why = _weight_of(weight)
        if why is not None:
            return None, None, None, why
        configs = content.config_records
        meta = decode_meta(configs[meta_key]) if meta_key in configs else {}
        state = from_arrayrecord(record)
    except Exception as e:  # any malformed reply is rejected, never raised
        return None, None, None, f"malformed reply: {type(e).__name__}: {e}"
    return state, weight, meta, None


def _payload(
    method: str, global_state: Mapping[str, torch.Tensor], budget: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Default per-client download: FlexLoRA's best rank-r factors, else the rank-r prefix."""
    rank = budget.get("rank")
    from fedlora.methods import prefix

    if rank is None or not prefix.lora_paths(global_state):
        return dict(global_state)
    if method == "flexlora":
        from fedlora.methods.flexlora import client_factors

        return client_factors(global_state, rank)
    return prefix.truncate(dict(global_state), rank)


# ------------------------------------------------------------------------------------- classes
_CLASSES: dict[str, type] = {}


def _build_classes() -> dict[str, type]:
    """Define the Flower-derived classes (needs flwr; done once, on first access)."""
    if _CLASSES:
        return _CLASSES
    try:
        from flwr.app import (
            ConfigRecord,
            Context,
            Error,
            Message,
            MessageType,
            MetricRecord,
            RecordDict,
        )
        from flwr.serverapp import Grid
        from flwr.serverapp.strategy import FedAvg
    except ImportError as e:
        raise _flwr_error() from e

    class FedLoRAStrategy(FedAvg):
        """Flower ``FedAvg`` (Message API) whose aggregation is :func:`fedlora.aggregate`.

        Args:
            method: a :data:`fedlora.METHODS` name (``"fedit"``, ``"hetlora"``, ``"ravan"``...).
            initial_state: the global state before round 1; optional, as ``configure_train``
                records the arrays the server loop passes it.
            budgets: per-client budgets: a mapping ``node id -> {"rank": r, "heads": K, ...}``,
                a list assigned to the nodes in ascending node-id order, or a callable
                ``node_id -> dict | None``. A budget's entries go into that node's train
                ``ConfigRecord``; with ``"rank"`` the node downloads the rank-``r`` prefix
                (FlexLoRA: its best rank-``r`` factors).
            payload_fn: ``(node_id, global_state, budget) -> state`` overriding the download.
            aggregate_fn: replaces :func:`fedlora.aggregate` (same signature).
            aggregate_options: keyword options for the method's rule (e.g. ``shared=True``).
            meta_key: name of the reply ConfigRecord holding the client meta.
            **kwargs: ``FedAvg`` arguments (``fraction_train``, ``min_train_nodes``,
                ``weighted_by_key``, ...).

        Attributes:
            global_state: the current global state (``dict[str, Tensor]``, float32).
            last_metrics: the full metrics of the last ``fedlora.aggregate`` call.
            last_rejections: ``[(node id, reason)]`` of the last round.
        """

        def __init__(
            self,
            method: str,
            *,
            initial_state: Mapping[str, torch.Tensor] | None = None,
            budgets: Mapping[int, Mapping[str, Any]]
            | Sequence[Mapping[str, Any]]
            | Callable[[int], Mapping[str, Any] | None]
            | None = None,
            payload_fn: Callable[[int, dict[str, torch.Tensor], Mapping[str, Any]], Any]
            | None = None,
            aggregate_fn: Callable[..., tuple[dict, dict]] | None = None,
            aggregate_options: Mapping[str, Any] | None = None,
            meta_key: str = META_KEY,
            **kwargs: Any,
        ) -> None:
            from fedlora.aggregation import METHODS

            if aggregate_fn is None and method not in METHODS:
                raise ValueError(f"method must be one of {METHODS}, got {method!r}")
            if budgets is not None and not (
                isinstance(budgets, (Mapping, Sequence)) or callable(budgets)
            ):
                raise TypeError(
                    f"budgets must be a mapping, a list or a callable, got {type(budgets).__name__}"
                )
            if payload_fn is not None and not callable(payload_fn):
                raise TypeError(f"payload_fn must be callable, got {type(payload_fn).__name__}")
            super().__init__(**kwargs)
            self.method = method
            self.global_state = None if initial_state is None else to_float32(initial_state)
            self.budgets = budgets
            self.payload_fn = payload_fn
            self.aggregate_fn = aggregate_fn
            self.aggregate_options = dict(aggregate_options or {})
            self.meta_key = meta_key
            self.last_metrics: dict[str, Any] = {}
            self.last_rejections: list[tuple[Any, str]] = []

        def summary(self) -> None:
            """Log the configuration (FedAvg's, plus the fedlora method)."""
            logger.info("FedLoRAStrategy: method %r, budgets %s", self.method, self.budgets)
            super().summary()

        # -------------------------------------------------------------- budgets
        def budget_of(self, node_id: int, node_ids: Sequence[int] = ()) -> dict[str, Any]:
            """The budget of ``node_id`` (``{}`` when it has none)."""
            b = self.budgets
            if b is None:
                return {}
            if callable(b) and not isinstance(b, Mapping):
                found = b(node_id)
            elif isinstance(b, Mapping):
                found = b.get(node_id)
            else:
                order = sorted(node_ids)
                found = b[order.index(node_id) % len(b)] if node_id in order and b else None
            if found is None:
                return {}
            if not isinstance(found, Mapping):
                raise TypeError(f"budget of node {node_id} must be a dict, got {found!r}")
            return dict(found)

        # -------------------------------------------------------------- train
        def configure_train(
            self, server_round: int, arrays: Any, config: Any, grid: Any
        ) -> Iterable[Any]:
            """FedAvg's sampling; each node gets its own payload when it has a budget."""
            if arrays is not None:
                self.global_state = from_arrayrecord(arrays)
            messages = list(super().configure_train(server_round, arrays, config, grid))
            if self.budgets is None and self.payload_fn is None:
                return messages
            node_ids = list(grid.get_node_ids())
            out = []
            for msg in messages:
                nid = msg.metadata.dst_node_id
                budget = self.budget_of(nid, node_ids)
                node_config = ConfigRecord(dict(config))
                for key, value in budget.items():
                    if not _config_value_ok(value):
                        raise TypeError(
                            f"budget entry {key!r} of node {nid} must be a ConfigRecord value, "
                            f"got {value!r}"
                        )
                    node_config[key] = value
                if self.payload_fn is not None:
                    state = self.payload_fn(nid, dict(self.global_state), budget)
                else:
                    state = _payload(self.method, self.global_state, budget)
                content = RecordDict(
                    {
                        self.arrayrecord_key: to_arrayrecord(state),
                        self.configrecord_key: node_config,
                    }
                )
                out.append(
                    Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid)
                )
            return out

        def aggregate_train(
            self, server_round: int, replies: Iterable[Any]
        ) -> tuple[Any | None, Any | None]:
            """Aggregate the replies with ``fedlora.aggregate``; bad replies are reported in the
            MetricRecord (``rejected``, ``num_rejected``), never raised."""
            replies = list(replies)
            clients, good = [], []
            for msg in replies:
                nid = _node_id(msg)
                if nid is None:  # None or not a Message: nothing to decode, no sender to name
                    clients.append((None, None, None, None, f"not a reply: {type(msg).__name__}"))
                    continue
                state, weight, meta, reason = _decode_reply(
                    msg, self.weighted_by_key, self.arrayrecord_key, self.meta_key
                )
                clients.append((nid, state, weight, meta, reason))
                if reason is None:
                    good.append(msg)
            if self.global_state is None:
                result = RoundResult()
                result.rejected = [(c[0], c[4] or "not aggregated") for c in clients]
                result.error = "no global state: pass initial_state= or call configure_train first"
                logger.error("aggregate_train: %s", result.error)
            else:
                result = aggregate_round(
                    self.method,
                    self.global_state,
                    clients,
                    aggregate_fn=self.aggregate_fn,
                    options=self.aggregate_options,
                )
            self.last_metrics = result.metrics
            self.last_rejections = result.rejected
            for nid, why in result.rejected:
                logger.warning("round %d: update of node %s rejected: %s", server_round, nid, why)
            metrics = MetricRecord()
            rejected_ids = {nid for nid, _ in result.rejected}
            used = [m for m in good if _node_id(m) not in rejected_ids]
            if used:
                try:
                    client_metrics = self.train_metrics_aggr_fn(
                        [m.content for m in used], self.weighted_by_key
                    )
                    for key, value in client_metrics.items():
                        metrics[key] = value
                except Exception as e:  # inconsistent client metrics: report ours only
                    logger.warning("round %d: client metrics not aggregated: %s", server_round, e)
            for key, value in result.scalar_metrics().items():
                metrics[key] = value
            if result.state is None:
                return None, metrics
            self.global_state = to_float32(result.state)
            return to_arrayrecord(self.global_state), metrics

    class FedLoRALegacyStrategy(_legacy_base()):
        """Pre-Message-API adapter: ``flwr.server.strategy.FedAvg`` whose ``aggregate_fit``
        calls :func:`fedlora.aggregate`.

        Parameters travel as NDArrays in the fixed order ``keys`` (e.g.
        ``list(get_peft_model_state_dict(model))``); clients convert with
        :func:`state_to_ndarrays` / :func:`ndarrays_to_state`. The weight is
        ``FitRes.num_examples``; a client meta travels JSON-encoded in ``FitRes.metrics[meta_key]``.
        Bad updates are left out and reported in the returned metrics (``num_rejected`` and
        ``rejected``, a JSON list of ``[cid, reason]``).
        """

        def __init__(
            self,
            method: str,
            keys: Sequence[str],
            *,
            initial_state: Mapping[str, torch.Tensor] | None = None,
            aggregate_fn: Callable[..., tuple[dict, dict]] | None = None,
            aggregate_options: Mapping[str, Any] | None = None,
            meta_key: str = META_KEY,
            **kwargs: Any,
        ) -> None:
            from flwr.common import ndarrays_to_parameters

            if isinstance(keys, str) or not isinstance(keys, Sequence) or not keys:
                raise ValueError(f"keys must be a non-empty list of state-dict keys, got {keys!r}")
            self.keys = list(keys)
            self.global_state = None if initial_state is None else to_float32(initial_state)
            if self.global_state is not None and "initial_parameters" not in kwargs:
                arrays = state_to_ndarrays(self.global_state, self.keys)
                kwargs["initial_parameters"] = ndarrays_to_parameters(arrays)
            super().__init__(**kwargs)
            self.method = method
            self.aggregate_fn = aggregate_fn
            self.aggregate_options = dict(aggregate_options or {})
            self.meta_key = meta_key
            self.last_metrics: dict[str, Any] = {}
            self.last_rejections: list[tuple[Any, str]] = []

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            """Record the global state the clients receive, then FedAvg's configuration."""
            from flwr.common import parameters_to_ndarrays

            self.global_state = ndarrays_to_state(parameters_to_ndarrays(parameters), self.keys)
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(
            self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]
        ) -> tuple[Any | None, dict[str, Any]]:
            """``fedlora.aggregate`` over the fit results; failures count as rejected."""
            from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

            if failures and not self.accept_failures:
                return None, {"aggregation_failed": 1, "num_rejected": len(failures)}
            clients = []
            for entry in results:
                if not (isinstance(entry, tuple) and len(entry) == 2):
                    clients.append((None, None, None, None, f"not a fit result: {entry!r:.60}"))
                    continue
                proxy, fit_res = entry
                cid = getattr(proxy, "cid", None)
                try:
                    state = ndarrays_to_state(parameters_to_ndarrays(fit_res.parameters), self.keys)
                    weight, why = _weight_of(fit_res.num_examples)
                    raw = (fit_res.metrics or {}).get(self.meta_key)
                    meta = json.loads(raw) if isinstance(raw, (str, bytes)) else {}
                    if not isinstance(meta, dict):
                        why = why or f"{self.meta_key} must encode a JSON object"
                    clients.append((cid, state, weight, meta, why))
                except Exception as e:
                    clients.append((cid, None, None, None, f"malformed: {type(e).__name__}: {e}"))
            for failure in failures:
                proxy = failure[0] if isinstance(failure, tuple) else None
                clients.append((getattr(proxy, "cid", None), None, None, None, "failure"))
            if self.global_state is None:
                return None, {"aggregation_failed": 1, "num_rejected": len(clients)}
            result = aggregate_round(
                self.method,
                self.global_state,
                clients,
                aggregate_fn=self.aggregate_fn,
                options=self.aggregate_options,
            )
            self.last_metrics = result.metrics
            self.last_rejections = result.rejected
            metrics: dict[str, Any] = {
                k: v for k, v in result.scalar_metrics().items() if not isinstance(v, list)
            }
            metrics["rejected"] = json.dumps([[str(c), why] for c, why in result.rejected])
            if result.state is None:
                return None, metrics
            self.global_state = to_float32(result.state)
            return ndarrays_to_parameters(state_to_ndarrays(self.global_state, self.keys)), metrics

    class LocalGrid(Grid):
        """A Flower ``Grid`` that runs a ``ClientApp`` in this process, one node after another.

        For tests, debugging and machines without Ray: ``strategy.start(grid=LocalGrid(app, 4),
        ...)`` or ``server_app(LocalGrid(client_app, 4), context)`` run real Flower messages
        through the real ``ClientApp`` dispatch, deterministically. Node ``i`` (id ``i + 1``)
        gets ``node_config = {"partition-id": i, "num-partitions": num_nodes}`` and keeps its
        ``Context`` across rounds. A ``ClientApp`` exception becomes an error reply, as in a
        deployment. Messages are deep-copied on the way in and out, as the wire would.
        """

        def __init__(
            self,
            client_app: Any,
            num_nodes: int = 2,
            *,
            run_config: Mapping[str, Any] | None = None,
            run_id: int = 1,
        ) -> None:
            if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
                raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
            if not callable(client_app):
                raise TypeError(f"client_app must be a ClientApp, got {type(client_app).__name__}")
            self.client_app = client_app
            self._run = None
            self._replies: dict[str, Any] = {}
            self.contexts = {
                i + 1: Context(
                    run_id=run_id,
                    node_id=i + 1,
                    node_config={"partition-id": i, "num-partitions": num_nodes},
                    state=RecordDict(),
                    run_config=dict(run_config or {}),
                )
                for i in range(num_nodes)
            }
            _ensure_task_identity(run_id)

        def set_run(self, run: Any) -> None:
            """Record the run (unused by the in-process delivery)."""
            self._run = run

        @property
        def run(self) -> Any:
            """The run set with :meth:`set_run` (None by default)."""
            return self._run

        def create_message(
            self,
            content: Any,
            message_type: str,
            dst_node_id: int,
            group_id: str,
            ttl: float | None = None,
        ) -> Any:
            """A new instruction message."""
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> list[int]:
            """Ids of the in-process nodes (1..num_nodes)."""
            return list(self.contexts)

        def push_messages(self, messages: Iterable[Any]) -> list[str]:
            """Deliver now; the returned ids index the stored replies."""
            ids = []
            for msg in messages:
                key = str(len(self._replies))
                self._replies[key] = self._deliver(msg)
                ids.append(key)
            return ids

        def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
            """The replies of pushed messages (each returned once)."""
            return [self._replies.pop(i) for i in message_ids if i in self._replies]

        def send_and_receive(
            self, messages: Iterable[Any], *, timeout: float | None = None
        ) -> list[Any]:
            """Deliver every message and return the replies, in order."""
            return [self._deliver(msg) for msg in messages]

        def _deliver(self, msg: Any) -> Any:
            import copy

            nid = msg.metadata.dst_node_id
            context = self.contexts.get(nid)
            if context is None:
                return Message(Error(code=0, reason=f"unknown node {nid}"), reply_to=msg)
            incoming = copy.deepcopy(msg)
            try:
                reply = self.client_app(incoming, context)
            except Exception as e:  # a client crash is an error reply, as on a real SuperNode
                return Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            return copy.deepcopy(reply)

    for cls in (FedLoRAStrategy, FedLoRALegacyStrategy, LocalGrid):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    _CLASSES.update(
        FedLoRAStrategy=FedLoRAStrategy,
        FedLoRALegacyStrategy=FedLoRALegacyStrategy,
        LocalGrid=LocalGrid,
    )
    return _CLASSES


def _legacy_base() -> type:
    try:
        from flwr.server.strategy import FedAvg
    except ImportError as e:  # pragma: no cover
        raise _flwr_error() from e
    return FedAvg


def _ensure_task_identity(run_id: int) -> None:
    """Messages need the process's task identity (set by Flower's runtimes); set it for an
    in-process run when no runtime did."""
    try:
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older flwr: messages need no task identity
        return
    try:
        TaskIdentity.run_id  # noqa: B018 - raises when unset
    except RuntimeError:
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return _build_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
