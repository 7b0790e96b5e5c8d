"""``FedLoRAStrategy``: Flower's Message-API ``FedAvg`` whose aggregation is ``fedlora.aggregate``.

Importing this module imports flwr; :mod:`fedlora.flower` imports it on first access to
:class:`FedLoRAStrategy`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from fedlora.flower._rounds import RoundCore, decode_messages
from fedlora.flower.budget import RANKS_KEY
from fedlora.flower.codec import (
    META_KEY,
    _config_value_ok,
    _flwr_error,
    from_arrayrecord,
    to_arrayrecord,
)

try:
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
except ImportError as e:  # pragma: no cover - fedlora.flower reports it on access
    raise _flwr_error() from e

__all__ = ["RANKS_KEY", "FedLoRAStrategy", "accumulate_base_merges"]

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
    adapter, the whole state for FedIT...), exactly as in ``fedlora simulate``.

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
        **kwargs: ``FedAvg`` arguments (``fraction_train``, ``min_train_nodes``,
            ``weighted_by_key``, ...).

    Attributes:
        global_state: the current global state (``dict[str, Tensor]``, float32).
        declared_budgets: ``{node id: budget}`` the nodes declared in their replies.
        last_metrics: the full metrics of the last ``fedlora.aggregate`` call.
        last_rejections: ``[(node id, reason)]`` of the last round.
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
        **kwargs: Any,
    ) -> None:
        from fedlora import methods

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
        self._client_side: Any = None

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
        kept: FlexLoRA's remembers the first global state it saw)."""
        if self._client_side is None:
            from fedlora import methods

            cls = self.registered.client if self.registered is not None else methods.Client
            options = self.client_options or _options_of(self.global_state)
            budgets = [self._full_budget(options, self.budget_of(n, node_ids)) for n in node_ids]
            self._client_side = cls(options, budgets)
        return self._client_side

    @staticmethod
    def _full_budget(options: Any, budget: Mapping[str, Any]) -> Any:
        """A :class:`fedlora.methods.Budget` with the run's defaults for missing entries; a
        declared entry above the global's is capped to it."""
        from fedlora.methods import Budget

        def get(key: str, default: int, cap: int | None = None) -> int:
            value = budget.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TypeError(f"budget entry {key!r} must be a positive int, got {value!r}")
            return min(value, cap) if cap is not None else value

        return Budget(
            rank=get("rank", options.rank, options.rank),
            heads=get("heads", options.heads, options.heads),
            components=get("components", options.rank, options.rank),
            steps=get("steps", 1),
        )

    # -------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: Any, config: Any, grid: Any
    ) -> Iterable[Any]:
        """FedAvg's sampling; each node gets the download for its budget."""
        if arrays is not None:
            self.global_state = from_arrayrecord(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if not messages or self.global_state is None:
            return messages
        node_ids = list(grid.get_node_ids())
        side = self.client_side(node_ids)
        if self._same_for_all(side):
            return messages
        budgets = {n: self.budget_of(n, node_ids) for n in node_ids}
        ranks = sorted({self._full_budget(side.options, b).rank for b in budgets.values()})
        downloads: dict[Any, Any] = {}  # one download per distinct budget
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
            if self.payload_fn is not None:
                record = to_arrayrecord(self.payload_fn(nid, dict(self.global_state), budget))
            else:
                full = self._full_budget(side.options, budget)
                if full not in downloads:
                    downloads[full] = to_arrayrecord(side.download(self.global_state, full))
                record = downloads[full]
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
        """Aggregate the replies with ``fedlora.aggregate``; bad replies are reported in the
        MetricRecord (``rejected``, ``num_rejected``), never raised. Budgets the replies
        declare are kept in :attr:`declared_budgets` for the nodes' next downloads."""
        replies = list(replies)
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
        rejected_ids = {cid for cid, _ in result.rejected}
        used = [
            msg
            for msg, c in zip(replies, clients, strict=True)
            if c.reason is None and c.cid not in rejected_ids
        ]
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


def accumulate_base_merges(
    previous: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``new`` with the base-merge instructions of ``previous`` prepended to its own.

    FLoRA and FedEx-LoRA return instructions (``<path>.lora_merge_B/A``,
    ``<path>.lora_residual_B/A``) that every client folds into its frozen base weight. In the
    simulator the clients share one model, so each round's instruction is applied once; over
    Flower a client builds its model from the pretrained base each round (a fresh process in a
    deployment, possibly sampled for the first time), so the strategy sends the sum of every
    round's merges so far, as one pair of factors: ``[B_1 B_2] [A_1; A_2] = B_1 A_1 + B_2 A_2``
    exactly. Its rank grows by the round's stack rank every round.
    """
    from fedlora.state_dict import BASE_MERGE_SUFFIXES

    out = dict(new)
    for b_suffix, a_suffix in BASE_MERGE_SUFFIXES:
        for key in [k for k in previous if k.endswith(b_suffix)]:
            a_key = key[: -len(b_suffix)] + a_suffix
            if a_key not in previous:
                continue
            B_old, A_old = previous[key], previous[a_key]
            if key in new and a_key in new:
                out[key] = torch.cat([B_old, new[key].to(B_old.dtype)], dim=1)
                out[a_key] = torch.cat([A_old, new[a_key].to(A_old.dtype)], dim=0)
            else:
                out[key], out[a_key] = B_old, A_old
    return out


def _options_of(global_state: Mapping[str, torch.Tensor] | None) -> Any:
    """The run's ClientOptions as far as a global state tells them (rank, heads)."""
    from fedlora import keys
    from fedlora.methods import ClientOptions

    state = dict(global_state or {})
    lora = keys.lora_paths(state)
    if lora:
        return ClientOptions(rank=int(state[keys.a_key(lora[0])].shape[0]))
    ravan = keys.ravan_paths(state)
    if ravan:
        H = state[keys.h_key(ravan[0])]
        return ClientOptions(rank=int(H.shape[-1]), heads=int(H.shape[0]))
    return ClientOptions()
