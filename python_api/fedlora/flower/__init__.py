"""Flower integration: a Message-API strategy that aggregates with :func:`fedlora.aggregate`.

Server side::

    from fedlora.flower import FedLoRAStrategy, to_arrayrecord
    strategy = FedLoRAStrategy("hetlora", budgets=[{"rank": 2}, {"rank": 4}], fraction_evaluate=0)
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(global_state), num_rounds=5)

Client side (inside ``@app.train()``)::

    state = from_arrayrecord(msg.content["arrays"])          # this client's download
    budget = client_budget(context.node_config, msg.content["config"])  # --node-config budget-*
    ... load, train, upload ...
    return train_reply(msg, upload_state, num_examples=n, meta=meta, budget=budget)

What travels where (DESIGN §2 state dicts, Flower records):

- arrays: one ``ArrayRecord`` (key ``"arrays"``) of PEFT-style keys; tensors are exported as
  float32 (numpy and Flower cannot carry bfloat16).
- weight: the reply's ``MetricRecord`` entry ``weighted_by_key`` (``"num-examples"``).
- per-client metadata (rank, heads trained, HAFL's updated components and scores, ...): a
  ``ConfigRecord`` named :data:`META_KEY` in the reply; values a ConfigRecord cannot hold
  (nested dicts, lists of lists) are JSON-encoded (see :func:`encode_meta`).
- per-client budgets: a node declares its own in its ``--node-config`` (``budget-rank``,
  ``budget-heads``, ``budget-components``, ``budget-steps``) and its reply carries it
  (:data:`BUDGET_KEY`); ``configure_train`` sends each node the method's download for that
  budget (``fedlora.methods.get(method).client(...).download``: a rank-``r_k`` prefix,
  FlexLoRA's rank-``r_k`` factors, ...) and its budget entries in the train ``ConfigRecord``.
  Before a node has declared one, the strategy's ``budgets`` argument applies
  (:mod:`fedlora.flower.budget`).

The strategy is a thin adapter over :class:`fedlora.rounds.Server` (no flwr in it), the
server bookkeeping ``fedlora simulate`` runs on: budgets, downloads, per-round rule options
(FLoRA's restart seed; Flower's ``server_round`` 1 is the server's round 0) and the hand-back
after aggregation (HAFL truncation's averaged scores), sent JSON-encoded in each node's train
``ConfigRecord`` under :data:`HANDBACK_KEY` (:func:`decode_handback` on the client, which gives it
to :meth:`fedlora.local.LocalClient.train`). A ClientApp trains with :mod:`fedlora.local`
(``examples/flower``), so a method gives the same numbers over Flower as in the simulator.

A reply the server did not ask for (from a node not sent a train message this round, a second
reply of a node, an upload above the node's budget, assigned or declared), one that is an error,
is malformed (no or several ArrayRecords, no weight, undecodable meta or budget) or that
:func:`fedlora.aggregate` rejects (unexpected keys, wrong shapes, NaN/inf) is left out of the
round and reported in the returned ``MetricRecord`` (``rejected``: node ids, ``num_rejected``);
the reasons are logged and kept in :attr:`FedLoRAStrategy.last_rejections`, and a round that
changed nothing says why in one line (:attr:`FedLoRAStrategy.round_errors`). Nothing a client
sends can stop the server loop. The global state is kept on the strategy across rounds
(``global_state``); replies are summed in node-id order, whatever order they arrived in.

Modules: :mod:`~fedlora.flower.codec` (records and metas), :mod:`~fedlora.flower.budget`
(per-node budgets), :mod:`~fedlora.flower._rounds` (the one reply-processing path of both
strategies), :mod:`~fedlora.flower.strategy` (:class:`FedLoRAStrategy`),
:mod:`~fedlora.flower.legacy` (:class:`FedLoRALegacyStrategy`, the pre-Message-API adapter:
``aggregate_fit`` over NDArrays in a fixed key order, see :func:`state_to_ndarrays`) and
:mod:`~fedlora.flower.local_grid` (:class:`LocalGrid`).

``flwr`` is imported lazily: this package imports without it; the three Flower-derived classes
are imported on first access, and without flwr that access raises an ``ImportError`` saying
what to install.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedlora.flower._rounds import RoundResult, aggregate_round
from fedlora.flower.budget import (
    NODE_CONFIG_KEYS,
    RANKS_KEY,
    check_budget,
    client_budget,
    node_budget,
)
from fedlora.flower.codec import (
    BUDGET_KEY,
    BUDGET_KEYS,
    HANDBACK_KEY,
    META_KEY,
    decode_handback,
    decode_meta,
    encode_handback,
    encode_meta,
    from_arrayrecord,
    meta_record,
    ndarrays_to_state,
    state_to_ndarrays,
    to_arrayrecord,
    to_float32,
    train_reply,
)
from fedlora.rounds import accumulate_base_merges

#: The Flower-derived classes and the module defining each (imported on first access).
_LAZY = {
    "FedLoRAStrategy": "fedlora.flower.strategy",
    "FedLoRALegacyStrategy": "fedlora.flower.legacy",
    "LocalGrid": "fedlora.flower.local_grid",
}

__all__ = [
    "BUDGET_KEY",
    "BUDGET_KEYS",
    "HANDBACK_KEY",
    "META_KEY",
    "NODE_CONFIG_KEYS",
    "RANKS_KEY",
    "FedLoRALegacyStrategy",
    "FedLoRAStrategy",
    "LocalGrid",
    "RoundResult",
    "accumulate_base_merges",
    "aggregate_round",
    "check_budget",
    "client_budget",
    "decode_handback",
    "decode_meta",
    "encode_handback",
    "encode_meta",
    "from_arrayrecord",
    "meta_record",
    "ndarrays_to_state",
    "node_budget",
    "state_to_ndarrays",
    "to_arrayrecord",
    "to_float32",
    "train_reply",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # the module imports flwr at its top and raises codec._flwr_error() without it
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
