"""``FedLoRAStrategy``: Flower's Message-API ``FedAvg`` whose aggregation is ``fedlora.aggregate``.

Importing this module imports flwr; :mod:`fedlora.flower` imports it on first access to
:class:`FedLoRAStrategy`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from fedlora.flower._rounds import RoundCore, _method_of, decode_messages, options_of
from fedlora.flower.budget import RANKS_KEY
from fedlora.flower.codec import (
    HANDBACK_KEY,
    META_KEY,
    _config_value_ok,
    _flwr_error,
    encode_handback,
    from_arrayrecord,
    to_arrayrecord,
)
from fedlora.rounds import Server, accumulate_base_merges, full_budget

try:
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
except ImportError as e:  # pragma: no cover - fedlora.flower reports it on access
    raise _flwr_error() from e

__all__ = ["HANDBACK_KEY", "RANKS_KEY", "FedLoRAStrategy", "accumulate_base_merges"]

logger = logging.getLogger("fedlora.flower")


Budgets = (
    Mapping[int, Mapping[str, Any]]
    | Sequence[Mapping[str, Any]]
    | Callable[[int], Mapping[str, Any] | None]
    | None
)


class FedLoRAStrategy(RoundCore, FedAvg):
    """Flower ``FedAvg`` (Message API) whose aggregation is :func:`fedlora.aggregate`.

    Each node downloads what the method's client side gives a client of its budget
    (``fedlora.methods.get(method).client(...).download``: the rank-``r`` prefix for HetLoRA and
    PreLort, FlexLoRA's best rank-``r`` factors with dead components refilled from the initial
    adapter, the whole state for FedIT...), exactly as in ``fedlora simulate``: the strategy is a
    thin adapter over :class:`fedlora.rounds.Server` (:attr:`server`), which keeps the budgets,
    computes the downloads, the per-round rule options (FLoRA's restart seed; Flower's
    ``server_round`` 1 is the server's round 0) and the hand-back (HAFL truncation's averaged
    scores, sent in each train ``ConfigRecord`` under :data:`fedlora.flower.HANDBACK_KEY`), and
    refuses the replies it did not ask for.

    Args:
        method: a :func:`fedlora.methods.names` name (``"fedit"``, ``"hetlora"``, ``"ravan"``...).
        initial_state: the global state before round 1; optional, as ``configure_train``
            records the arrays the server loop passes it.
        budgets: the server's per-client budgets: a mapping ``node id -> {"rank": r, "heads":
            K, ...}``, a list assigned to the nodes in ascending node-id order, or a callable
            ``node_id -> dict | None``. A budget a node declares in its reply (its
            ``--node-config budget-*`` keys, see :mod:`fedlora.flower.budget`) replaces these
            from that node's next round on. A budget's entries go into that node's train
            ``ConfigRecord``.
        client_options: the run's :class:`fedlora.methods.ClientOptions` (global rank, heads,
            ...) for the client side's downloads; by default read from the global state.
        payload_fn: ``(node_id, global_state, budget) -> state`` overriding the download.
        aggregate_fn: replaces :func:`fedlora.aggregate` (same signature; ``method`` may then
            be a name the registry does not know, and downloads are the whole state).
        aggregate_options: keyword options for the method's rule (e.g. ``shared=True``).
        meta_key: name of the reply ConfigRecord holding the client meta.
        seed: the run seed of the per-round rule options (FLoRA's restart seed), as
            ``fedlora simulate --seed`` (:meth:`fedlora.rounds.Server.round_options`).
        dp: a :class:`fedlora.privacy.PrivateAggregator`: client-level DP on the server (each
            reply clipped again, Gaussian noise on the sums, public denominators, ε in the
            round's metrics); the ClientApps clip their own uploads too
            (``LocalClient.train(..., dp_clip=C)``).
        **kwargs: ``FedAvg`` arguments (``fraction_train``, ``min_train_nodes``,
            ``weighted_by_key``, ...).

    Attributes:
        global_state: the current global state (``dict[str, Tensor]``, float32).
        declared_budgets: ``{node id: budget}`` the nodes declared in their replies.
        last_metrics: the full metrics of the last ``fedlora.aggregate`` call.
        last_rejections: ``[(node id, reason)]`` of the last round.
        last_error: why the last round changed nothing (one line), or None.
        server: the :class:`fedlora.rounds.Server` (made at the first ``configure_train``).
    """

    def __init__(
        self,
        method: str,
        *,
        initial_state: Mapping[str, torch.Tensor] | None = None,
        budgets: Budgets = None,
        client_options: Any = None,
        payload_fn: Callable[[int, dict[str, torch.Tensor], Mapping[str, Any]], Any] | None = None,
        aggregate_fn: Callable[..., tuple[dict, dict]] | None = None,
        aggregate_options: Mapping[str, Any] | None = None,
        meta_key: str = META_KEY,
        seed: int = 0,
        dp: Any = None,
        **kwargs: Any,
    ) -> None:
        from fedlora import methods

        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if dp is not None:
            from fedlora.privacy import PrivateAggregator

            if not isinstance(dp, PrivateAggregator):
                raise TypeError(
                    f"dp must be a fedlora.privacy.PrivateAggregator, got {type(dp).__name__}"
                )
        if aggregate_fn is None or method in methods.names():
            methods.get(method)  # ValueError listing the known names
        if budgets is not None and not (
            isinstance(budgets, (Mapping, Sequence)) or callable(budgets)
        ):
            raise TypeError(
                f"budgets must be a mapping, a list or a callable, got {type(budgets).__name__}"
            )
        if payload_fn is not None and not callable(payload_fn):
            raise TypeError(f"payload_fn must be callable, got {type(payload_fn).__name__}")
        if client_options is not None and not isinstance(client_options, methods.ClientOptions):
            raise TypeError(
                "client_options must be a fedlora.methods.ClientOptions, got "
                f"{type(client_options).__name__}"
            )
        super().__init__(**kwargs)
        self._init_core(method, initial_state, aggregate_fn, aggregate_options, meta_key)
        self.budgets = budgets
        self.client_options = client_options
        self.payload_fn = payload_fn
        self.declared_budgets: dict[int, dict[str, int]] = {}
        self._node_ids: list[int] = []
        self.dp = dp
        self.seed = seed

    def summary(self) -> None:
        """Log the configuration (FedAvg's, plus the fedlora method)."""
        logger.info("FedLoRAStrategy: method %r, budgets %s", self.method, self.budgets)
        super().summary()

    # -------------------------------------------------------------- budgets
    def budget_of(self, node_id: int, node_ids: Sequence[int] = ()) -> dict[str, Any]:
        """The budget of ``node_id`` (``{}`` when it has none): the strategy's ``budgets``
        entry, updated with what the node declared in its last reply."""
        b = self.budgets
        found: Any = None
        if b is None:
            found = None
        elif callable(b) and not isinstance(b, Mapping):
            found = b(node_id)
        elif isinstance(b, Mapping):
            found = b.get(node_id)
        else:
            order = sorted(node_ids)
            found = b[order.index(node_id) % len(b)] if node_id in order and b else None
        if found is not None and not isinstance(found, Mapping):
            raise TypeError(f"budget of node {node_id} must be a dict, got {found!r}")
        return {**dict(found or {}), **self.declared_budgets.get(node_id, {})}

    def client_side(self, node_ids: Sequence[int] = ()) -> Any:
        """The method's client-side object the downloads come from (made on first use, then
        kept: FlexLoRA's remembers the first global state it saw; HAFL truncation's the
        server's averaged scores)."""
        return self._server(node_ids).side

    def _server(self, node_ids: Sequence[int] = ()) -> Server:
        """The run's :class:`fedlora.rounds.Server` (made on first use: budgets from
        :meth:`budget_of`, the method's client side for the downloads)."""
        if self.global_state is None:
            raise ValueError(
                "FedLoRAStrategy has no global state yet: pass initial_state= or let "
                "configure_train receive the arrays"
            )
        if node_ids:
            self._node_ids = list(node_ids)
        if self.server is None:
            from fedlora import methods

            cls = self.registered.client if self.registered is not None else methods.Client
            options = self.client_options or options_of(self.global_state)
            budgets = [full_budget(options, self.budget_of(n, self._node_ids)) for n in node_ids]
            self.server = Server(
                _method_of(self.method),
                self.global_state,
                options=options,
                budgets=lambda nid: self.budget_of(nid, self._node_ids),
                aggregate_fn=self.aggregate_fn,
                aggregate_options=self.aggregate_options,
                side=cls(options, budgets),
                seed=self.seed,
                dp=self.dp,
            )
        return self.round_server()

    def _make_server(self) -> Server:
        return self._server()

    # -------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: Any, config: Any, grid: Any
    ) -> Iterable[Any]:
        """FedAvg's sampling; each node gets the download for its budget
        (:meth:`fedlora.rounds.Server.configure`), its budget entries, the run's ranks and the
        server's hand-back (:data:`HANDBACK_KEY`: HAFL truncation's averaged scores) in its
        train ``ConfigRecord``. Only the nodes sent a message may reply this round."""
        if arrays is not None:
            self.global_state = from_arrayrecord(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.global_state is None:
            return messages
        node_ids = list(grid.get_node_ids())
        server = self._server(node_ids)
        downloads = server.configure(
            server_round - 1, [msg.metadata.dst_node_id for msg in messages]
        )
        handback = server.handback()
        if not messages or (self._same_for_all(server.side) and handback is None):
            return messages
        budgets = {n: self.budget_of(n, node_ids) for n in node_ids}
        ranks = sorted({full_budget(server.options, b).rank for b in budgets.values()})
        records: dict[Any, Any] = {}  # one ArrayRecord per distinct budget
        out = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            budget = budgets[nid] if nid in budgets else self.budget_of(nid, node_ids)
            node_config = ConfigRecord(dict(config))
            for key, value in budget.items():
                if not _config_value_ok(value):
                    raise TypeError(
                        f"budget entry {key!r} of node {nid} must be a ConfigRecord value, "
                        f"got {value!r}"
                    )
                node_config[key] = value
            node_config[RANKS_KEY] = ranks
            if handback is not None:
                node_config[HANDBACK_KEY] = encode_handback(handback)
            if self.payload_fn is not None:
                record = to_arrayrecord(self.payload_fn(nid, dict(self.global_state), budget))
            else:
                d = downloads[nid]
                if d.budget not in records:
                    records[d.budget] = to_arrayrecord(d.state)
                record = records[d.budget]
            content = RecordDict({self.arrayrecord_key: record, self.configrecord_key: node_config})
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid))
        return out

    def _same_for_all(self, side: Any) -> bool:
        """True when every node receives the global state unchanged (FedAvg's messages do)."""
        from fedlora import methods

        return (
            self.payload_fn is None
            and self.budgets is None
            and not self.declared_budgets
            and type(side).download is methods.Client.download
        )

    def _changes_base(self) -> bool:
        return self.registered is not None and self.registered.changes_base

    def aggregate_train(
        self, server_round: int, replies: Iterable[Any]
    ) -> tuple[Any | None, Any | None]:
        """Aggregate the replies with ``fedlora.aggregate`` through the run's
        :class:`fedlora.rounds.Server`; never raises for client input.

        Refused, and named in the MetricRecord (``rejected``: node ids, ``num_rejected``; the
        reasons are logged and kept in :attr:`last_rejections`): error and malformed replies, a
        reply from a node not sent a train message this round, a second reply of a node, an
        upload above the budget the server holds for the node this round (assigned by
        ``budgets``, or declared by the node in an earlier reply), and uploads
        ``fedlora.aggregate`` rejects. A round that changes
        nothing says why in one log line (:attr:`last_error`). Budgets the replies declare are
        kept in :attr:`declared_budgets` for the nodes' next downloads."""
        replies = sorted(replies, key=_sender_order)  # arrival order must not change sums
        clients, declared = decode_messages(
            replies,
            weighted_by_key=self.weighted_by_key,
            arrayrecord_key=self.arrayrecord_key,
            meta_key=self.meta_key,
        )
        self.declared_budgets.update(declared)
        previous = self.global_state
        result = self.finish_round(server_round, clients)
        if result.state is not None and previous is not None and self._changes_base():
            self.global_state = accumulate_base_merges(previous, self.global_state)
            self.server.global_state = dict(self.global_state)
        used, seen = [], set()
        for msg, c in zip(replies, clients, strict=True):
            if c.reason is None and c.cid in result.used and c.cid not in seen:
                used.append(msg)  # the first reply of a node (a second one is refused)
                seen.add(c.cid)
        metrics = MetricRecord()
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
        return to_arrayrecord(self.global_state), metrics


def _sender_order(msg: Any) -> tuple[int, int]:
    """Replies in ascending sender node id (replies without one last), so that the weighted
    sums of a round do not depend on the order the replies arrived in."""
    try:
        nid = msg.metadata.src_node_id
    except AttributeError:
        return (1, 0)
    return (0, nid) if isinstance(nid, int) and not isinstance(nid, bool) else (1, 0)
