"""Per-client budgets over Flower: a node declares its own, the server follows the declaration.

A budget says what one client can afford: LoRA ``rank``, Ravan ``heads``, HAFL trainable
``components``, local ``steps`` (:class:`fedlora.methods.Budget`; a method reads the fields in its
``budget_fields``). In a deployment the SuperNode's operator knows its node, so the budget lives
in the node's config::

    flower-supernode ... --node-config "partition-id=0 num-partitions=2 budget-rank=4 budget-heads=2"

The keys (:data:`NODE_CONFIG_KEYS`) are ``budget-rank``, ``budget-heads``, ``budget-components``
and ``budget-steps``; each is optional, a positive int.

How a round uses it:

1. the server's ``configure_train`` sends each node the download for the budget it knows for it
   (:meth:`fedlora.flower.FedLoRAStrategy.budget_of`): the budget the node declared in its last
   reply if it declared one, else the strategy's ``budgets`` argument (a mapping by node id, a
   callable, or a list given to the nodes in ascending node-id order: the fallback for the first
   round and for simulations, where node ids are assigned by the runtime), else none (the full
   global state);
2. the ClientApp trains under :func:`client_budget`: its node-config entries, else the entries
   the server sent in the train config, else the run's defaults; it never trains more than it
   received (a rank-``r`` payload trains at most rank ``r``);
3. the reply carries that budget (``train_reply(..., budget=...)``, a ``ConfigRecord`` named
   :data:`fedlora.flower.BUDGET_KEY`), and the strategy remembers it for the node's next round.

So from the second round a node downloads exactly its declared budget's payload (a rank-``r_k``
prefix, FlexLoRA's best rank-``r_k`` factors), whatever its random node id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Budget entries a server may send to a client and a client may declare (ConfigRecord ints).
BUDGET_KEYS = ("rank", "heads", "components", "steps")
#: Train-config entry listing the distinct ranks of the run's nodes, as far as the server knows
#: them (PreLort's nested loss trains under the ranks of every client of the run, not only its own).
RANKS_KEY = "fedlora-ranks"
#: ``--node-config`` key of each budget entry.
NODE_CONFIG_KEYS = {key: f"budget-{key}" for key in BUDGET_KEYS}


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())  # "--node-config budget-rank='4'" arrives as a string
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive int, got {value!r}")
    return int(value)


def check_budget(budget: Mapping[str, Any], where: str = "budget") -> dict[str, int]:
    """``budget`` restricted to :data:`BUDGET_KEYS`, every value a positive int; ``ValueError``
    naming the entry otherwise (unknown entries are refused too, they are a typo)."""
    if not isinstance(budget, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(budget).__name__}")
    unknown = sorted(str(k) for k in budget if k not in BUDGET_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown entries {unknown}; known: {list(BUDGET_KEYS)}")
    return {k: _positive_int(budget[k], f"{where}[{k!r}]") for k in BUDGET_KEYS if k in budget}


def node_budget(node_config: Mapping[str, Any]) -> dict[str, int]:
    """The budget a SuperNode declares in its ``--node-config`` (``{}`` when it declares none);
    ``ValueError`` naming the key for a value that is not a positive int."""
    return {
        key: _positive_int(node_config[name], f"node config {name!r}")
        for key, name in NODE_CONFIG_KEYS.items()
        if name in node_config
    }


def client_budget(
    node_config: Mapping[str, Any], train_config: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """The budget a ClientApp trains under: its node config's entries, else those the server
    sent in the train ``ConfigRecord``. Entries neither gives are absent (the run's default)."""
    out: dict[str, int] = {}
    for key in BUDGET_KEYS:
        value = (train_config or {}).get(key)
        if value is not None and not isinstance(value, bool) and isinstance(value, int):
            out[key] = int(value)
    out.update(node_budget(node_config))
    return out
