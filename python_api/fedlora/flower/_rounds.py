"""The one reply-processing path both strategies share (Message API and legacy API).

A round is: decode every reply into a :class:`ClientReply` ``(client id, state, weight, meta,
reason)`` (:func:`decode_messages` for Message-API replies, :func:`decode_fit_results` for the
legacy ``FitRes``), then :meth:`RoundCore.finish_round`: the run's :class:`fedlora.rounds.Server`
screens them (unasked, duplicate and over-budget replies are refused) and aggregates the rest with
:func:`fedlora.aggregate`, mapping its rejections back to client ids; the strategy keeps the
Flower-facing bookkeeping (``global_state``, ``last_metrics``, ``last_rejections``,
``last_error``). The strategies only encode the result for their API. Nothing here imports flwr
at module level.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from fedlora.flower.budget import check_budget
from fedlora.flower.codec import (
    BUDGET_KEY,
    META_KEY,
    _weight_of,
    decode_meta,
    from_arrayrecord,
    ndarrays_to_state,
    to_float32,
)
from fedlora.methods import ClientOptions, Method
from fedlora.rounds import Outcome, Reply, Server

__all__ = [
    "ClientReply",
    "RoundCore",
    "RoundResult",
    "aggregate_round",
    "decode_fit_results",
    "decode_messages",
]

logger = logging.getLogger("fedlora.flower")


class ClientReply(NamedTuple):
    """One decoded reply; ``reason`` is None when the reply is usable, else why it is not."""

    cid: Any
    state: Mapping[str, torch.Tensor] | None
    weight: float | None
    meta: Any
    reason: str | None


def _rejected(cid: Any, reason: str) -> ClientReply:
    return ClientReply(cid, None, None, None, reason)


class RoundResult:
    """What :func:`aggregate_round` and :meth:`RoundCore.finish_round` return (the Flower view of
    a :class:`fedlora.rounds.Outcome`).

    Attributes:
        state: the new global state, or None when the round changed nothing (every client
            rejected, or the aggregation failed).
        metrics: ``fedlora.aggregate``'s metrics (empty when it was not called).
        rejected: ``[(client id, reason)]`` for every client left out, at any stage.
        used: the ids of the clients whose uploads were aggregated.
        error: why the whole round changed nothing (one line), or None.
    """

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None
        self.metrics: dict[str, Any] = {}
        self.rejected: list[tuple[Any, str]] = []
        self.used: list[Any] = []
        self.error: str | None = None
        self.num_clients = 0

    @classmethod
    def from_outcome(cls, outcome: Outcome, num_clients: int) -> RoundResult:
        """The result of one :meth:`fedlora.rounds.Server.aggregate` call on ``num_clients``
        replies."""
        result = cls()
        result.state, result.metrics = outcome.state, dict(outcome.metrics)
        result.rejected, result.used = list(outcome.rejected), list(outcome.used)
        result.error, result.num_clients = outcome.error, num_clients
        return result

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
        rejected = [c for c, _ in self.rejected]
        for key, ids in (("used", self.used), ("rejected", rejected)):
            ids = [c for c in ids if c is not None]  # a reply with no sender is only counted
            if all(isinstance(c, int) and not isinstance(c, bool) for c in ids):
                out[key] = ids
        out["clients_total"] = self.num_clients
        out["clients_used"] = len(self.used)
        out["num_rejected"] = len(rejected)
        out["aggregation_failed"] = int(self.state is None)
        return out


def _numbers(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _method_of(name: str) -> Method:
    """The registered method ``name``, or a stand-in for a name only a custom ``aggregate_fn``
    knows (equal ranks, nothing to check against a budget, whole-state downloads)."""
    from fedlora import methods

    if name in methods.names():
        return methods.get(name)

    def unused(*args: Any, **kwargs: Any) -> Any:  # pragma: no cover - aggregate_fn replaces it
        raise NotImplementedError(name)

    return Method(name=name, layer="lora", ranks="equal", aggregate=unused)


def options_of(global_state: Mapping[str, torch.Tensor] | None) -> ClientOptions:
    """The run's :class:`fedlora.methods.ClientOptions` as far as a global state tells them
    (LoRA rank; Ravan heads and per-head rank); the defaults for anything else."""
    from fedlora import keys

    state = dict(global_state or {})
    lora = keys.lora_paths(state)
    if lora:
        return ClientOptions(rank=int(state[keys.a_key(lora[0])].shape[0]))
    ravan = keys.ravan_paths(state)
    if ravan:
        H = state[keys.h_key(ravan[0])]
        return ClientOptions(rank=int(H.shape[-1]), heads=int(H.shape[0]))
    return ClientOptions()


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
    means the framework layer already rejected it (error reply, malformed record). The rest go
    through :meth:`fedlora.rounds.Server.aggregate` (round 0 of a server with no budgets):
    ``aggregate_fn`` (default :func:`fedlora.aggregate`) with ``options``, whose own rejections
    (keys, shapes, NaN/inf, meta) are mapped back to client ids. An exception of
    ``aggregate_fn`` (e.g. a bad global state) fails the round: ``state`` is None and ``error``
    says why.
    """
    server = Server(
        _method_of(method),
        global_state,
        options=options_of(global_state),
        aggregate_fn=aggregate_fn,
        aggregate_options=options,
    )
    replies = [Reply(*c) for c in clients]
    return RoundResult.from_outcome(server.aggregate(0, replies), len(replies))


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


def decode_messages(
    replies: Iterable[Any],
    *,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str = "arrays",
    meta_key: str = META_KEY,
) -> tuple[list[ClientReply], dict[int, dict[str, int]]]:
    """Message-API train replies as :class:`ClientReply` entries (in order), and the budgets
    the senders declared (``{node id: budget}``, see :mod:`fedlora.flower.budget`). A ``None``
    or a non-Message counts as a rejected reply with no sender; never raises."""
    clients, budgets = [], {}
    for msg in replies:
        nid = _node_id(msg)
        if nid is None:  # None or not a Message: nothing to decode, no sender to name
            clients.append(_rejected(None, f"not a reply: {type(msg).__name__}"))
            continue
        state, weight, meta, reason = _decode_reply(msg, weighted_by_key, arrayrecord_key, meta_key)
        if reason is None:
            budget, reason = _declared_budget(msg)
            if budget is not None:
                budgets[nid] = budget
        clients.append(ClientReply(nid, state, weight, meta, reason))
    return clients, budgets


def _declared_budget(msg: Any) -> tuple[dict[str, int] | None, str | None]:
    configs = msg.content.config_records
    if BUDGET_KEY not in configs:
        return None, None
    try:
        return check_budget(dict(configs[BUDGET_KEY].items()), BUDGET_KEY), None
    except (TypeError, ValueError) as e:
        return None, f"malformed reply: {e}"


def decode_fit_results(
    results: Sequence[Any], failures: Sequence[Any], keys: Sequence[str], meta_key: str = META_KEY
) -> list[ClientReply]:
    """Legacy ``(ClientProxy, FitRes)`` results and failures as :class:`ClientReply` entries:
    parameters in the fixed key order ``keys``, the weight ``FitRes.num_examples``, the meta
    JSON-encoded in ``FitRes.metrics[meta_key]``; every failure counts as rejected."""
    from flwr.common import parameters_to_ndarrays

    clients = []
    for entry in results:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            clients.append(_rejected(None, f"not a fit result: {entry!r:.60}"))
            continue
        proxy, fit_res = entry
        cid = getattr(proxy, "cid", None)
        try:
            state = ndarrays_to_state(parameters_to_ndarrays(fit_res.parameters), keys)
            weight, why = _weight_of(fit_res.num_examples)
            raw = (fit_res.metrics or {}).get(meta_key)
            meta = json.loads(raw) if isinstance(raw, (str, bytes)) else {}
            if not isinstance(meta, dict):
                why = why or f"{meta_key} must encode a JSON object"
            clients.append(ClientReply(cid, state, weight, meta, why))
        except Exception as e:
            clients.append(_rejected(cid, f"malformed: {type(e).__name__}: {e}"))
    for failure in failures:
        proxy = failure[0] if isinstance(failure, tuple) else None
        clients.append(_rejected(getattr(proxy, "cid", None), "failure"))
    return clients


# ------------------------------------------------------------------------------------- the round
class RoundCore:
    """The server state and the round tail both strategies share (a mixin in front of Flower's
    ``FedAvg``; it holds no flwr code): a :class:`fedlora.rounds.Server` does the bookkeeping,
    this class keeps the Flower-facing attributes.

    Attributes:
        method: the :mod:`fedlora.methods` name the rounds aggregate with.
        registered: its :class:`fedlora.methods.Method`, or None for a name the registry does
            not know (possible with a custom ``aggregate_fn``).
        global_state: the current global state (``dict[str, Tensor]``, float32), or None.
        server: the :class:`fedlora.rounds.Server` (made on first use, from the global state).
        last_metrics: the full metrics of the last ``fedlora.aggregate`` call.
        last_rejections: ``[(client id, reason)]`` of the last round.
        last_error: why the last round changed nothing (one line), or None.
        round_errors: ``{server_round: that line}`` for every round that changed nothing.
    """

    def _init_core(
        self,
        method: str,
        initial_state: Mapping[str, torch.Tensor] | None,
        aggregate_fn: Callable[..., tuple[dict, dict]] | None,
        aggregate_options: Mapping[str, Any] | None,
        meta_key: str,
    ) -> None:
        from fedlora import methods

        self.method = method
        self.registered = methods.get(method) if method in methods.names() else None
        self.global_state = None if initial_state is None else to_float32(initial_state)
        self.aggregate_fn = aggregate_fn
        self.aggregate_options = dict(aggregate_options or {})
        self.meta_key = meta_key
        self.server: Server | None = None
        self.last_metrics: dict[str, Any] = {}
        self.last_rejections: list[tuple[Any, str]] = []
        self.last_error: str | None = None
        self.round_errors: dict[int, str] = {}

    def _make_server(self) -> Server:
        """The :class:`fedlora.rounds.Server` of this run (strategies override it to give
        budgets and a client side)."""
        return Server(
            _method_of(self.method),
            self.global_state,
            options=options_of(self.global_state),
            aggregate_fn=self.aggregate_fn,
            aggregate_options=self.aggregate_options,
        )

    def round_server(self) -> Server:
        """The run's server, its global state set to :attr:`global_state`."""
        if self.server is None:
            self.server = self._make_server()
        self.server.global_state = dict(self.global_state)
        return self.server

    def finish_round(self, server_round: int, clients: Sequence[ClientReply]) -> RoundResult:
        """Aggregate the decoded replies (Flower's ``server_round``, 1-based) into the global
        state with :meth:`fedlora.rounds.Server.aggregate`; never raises for client input.

        The server refuses replies it did not ask for this round (see
        :meth:`fedlora.rounds.Server.screen`). On success ``global_state`` becomes the new state
        (float32); otherwise it is unchanged, ``result.state`` is None and ``result.error``
        says why in one line. Every rejection is logged and kept in ``last_rejections``.
        """
        if self.global_state is None:
            result = RoundResult()
            result.num_clients = len(clients)
            result.rejected = [(c[0], c[4] or "not aggregated") for c in clients]
            result.error = (
                f"round {server_round}: no global state: pass initial_state= or call "
                "configure_train first"
            )
            logger.error("%s", result.error)
        else:
            server = self.round_server()
            replies = [Reply(*c) for c in clients]
            outcome = server.aggregate(server_round - 1, replies)
            result = RoundResult.from_outcome(outcome, len(replies))
            if result.state is None:  # the server logs the rejections of a round that changed
                for cid, why in result.rejected:  # the state; these are for one that did not
                    logger.warning(
                        "round %d: update of client %s rejected: %s", server_round, cid, why
                    )
        self.last_metrics = result.metrics
        self.last_rejections = result.rejected
        self.last_error = result.error
        if result.error is not None:
            self.round_errors[server_round] = result.error
        if result.state is not None:
            self.global_state = to_float32(result.state)
        return result
