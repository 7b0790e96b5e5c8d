"""The server's round bookkeeping, shared by ``fedlora simulate`` and every FL framework.

:func:`fedlora.aggregate` is the server's rule on one round's uploads. Around it a server keeps
state from round to round, and this module is that state, with no framework code (no flwr
import): which clients a round samples (:func:`sample_clients`), each client's budget, what each
one downloads (the method's client side: rank prefixes, FlexLoRA's best rank-``r`` factors,
HAFL truncation's top components by the server's averaged scores), the per-method round options
(FLoRA's restart seed), what the server hands back with each download (:meth:`Server.handback`:
HAFL truncation's scores, so a client built fresh each round knows where its components
belong), and which replies are refused and why. The simulator is a loop over :class:`Server`
and :class:`fedlora.local.LocalClient`; :class:`fedlora.flower.FedLoRAStrategy` is a thin
adapter over :class:`Server`, as Flower's own strategies are thin over their utilities.

A round::

    server = Server("hafl", initial_state, options=ClientOptions(rank=8, hafl_mode="truncate"),
                    budgets={cid: Budget(rank=4, heads=1, components=4, steps=5) for cid in ids})
    downloads = server.configure(round_idx, server.sample(round_idx, ids))  # {cid: Download}
    ... each client trains (fedlora.local.LocalClient.train(d.state, d.budget, ..., seed=d.seed,
        handback=d.handback)) and replies ...
    outcome = server.aggregate(round_idx, [Reply(cid, state, weight, meta), ...])
    outcome.rejected  # [(cid, reason)]: unasked, duplicate, over budget, NaN, malformed...

Rounds are 0-based here (Flower's ``server_round`` 1 is round 0).
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fedlora import keys
from fedlora.methods import Budget, Client, ClientOptions, Method
from fedlora.methods import get as get_method
from fedlora.seeding import key

__all__ = [
    "Download",
    "Outcome",
    "Reply",
    "Server",
    "accumulate_base_merges",
    "full_budget",
    "sample_clients",
    "upload_over_budget",
]

logger = logging.getLogger("fedlora.rounds")

#: purpose tags of the seed rule (:func:`fedlora.seeding.key`)
ROUND_TAG, SAMPLE_TAG = 13, 17


def sample_clients(
    seed: int, round_idx: int, clients: Sequence[Any], per_round: int | None
) -> list:
    """The clients of round ``round_idx``: all of ``clients`` (``per_round`` None or ≥ their
    number), else ``per_round`` of them drawn without replacement by a generator seeded with
    ``(seed, round_idx)``, in the order of ``clients`` (so a resumed run, both engines and any
    framework draw the same ones)."""
    clients = list(clients)
    if per_round is None or per_round >= len(clients):
        return clients
    if isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1:
        raise ValueError(f"per_round must be a positive int or None, got {per_round!r}")
    gen = torch.Generator().manual_seed(key(seed, round_idx, SAMPLE_TAG))
    chosen = sorted(torch.randperm(len(clients), generator=gen)[:per_round].tolist())
    return [clients[i] for i in chosen]


def full_budget(
    options: ClientOptions, budget: Mapping[str, Any] | Budget | None, steps: int = 1
) -> Budget:
    """A :class:`fedlora.methods.Budget` from a partial one (``{"rank": 4}``): the run's
    defaults (global rank, every head, every component, ``steps``) for missing entries; an
    entry above the run's is capped to it."""
    if isinstance(budget, Budget):
        return budget
    if budget is not None and not isinstance(budget, Mapping):
        raise TypeError(f"a budget must be a Budget or a dict, got {budget!r}")
    budget = dict(budget or {})

    def get(name: str, default: int, cap: int | None = None) -> int:
        value = budget.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TypeError(f"budget entry {name!r} must be a positive int, got {value!r}")
        return min(value, cap) if cap is not None else value

    return Budget(
        rank=get("rank", options.rank, options.rank),
        heads=get("heads", options.heads, options.heads),
        components=get("components", options.rank, options.rank),
        steps=get("steps", steps),
    )


def upload_over_budget(
    method: Method, state: Mapping[str, Any], meta: Any, budget: Budget
) -> str | None:
    """Why ``state``/``meta`` is more than a client of ``budget`` may upload (None if it is
    not): a LoRA rank above ``budget.rank`` (prefix and indexed methods), more trained
    components than ``budget.components`` (HAFL), more trained heads than ``budget.heads``
    (Ravan). Malformed uploads are left to :func:`fedlora.aggregate`'s checks."""
    meta = meta if isinstance(meta, Mapping) else {}
    if "rank" in method.budget_fields and method.ranks != "equal":
        for k, v in state.items():
            if k.endswith(keys.A_SUFFIX) and isinstance(v, torch.Tensor) and v.dim() == 2:
                if v.shape[0] > budget.rank:
                    return f"{k} has rank {v.shape[0]} above the client's budget {budget.rank}"
    if "components" in method.budget_fields:
        for path, idx in (
            (meta.get("updated") or {}).items() if isinstance(meta.get("updated"), Mapping) else ()
        ):
            if isinstance(idx, (list, tuple)) and len(idx) > budget.components:
                return (
                    f"meta['updated'][{path!r}] lists {len(idx)} components, above the client's "
                    f"budget {budget.components}"
                )
    if "heads" in method.budget_fields:
        heads = meta.get("heads")
        for path, idx in heads.items() if isinstance(heads, Mapping) else ():
            if isinstance(idx, (list, tuple)) and len(idx) > budget.heads:
                return f"meta['heads'][{path!r}] lists {len(idx)} heads, above the budget {budget.heads}"
        for k, v in state.items():
            if k.endswith(keys.H_SUFFIX) and isinstance(v, torch.Tensor) and v.dim() == 3:
                listed = heads.get(k[: -len(keys.H_SUFFIX)]) if isinstance(heads, Mapping) else None
                if listed is None and v.shape[0] > budget.heads and v.shape[0] != 0:
                    # a full-form upload (every head) must say which heads it trained
                    return (
                        f"{k} holds {v.shape[0]} heads without meta['heads'], budget {budget.heads}"
                    )
    return None


def accumulate_base_merges(
    previous: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``new`` with the base-merge instructions of ``previous`` prepended to its own.

    FLoRA and FedEx-LoRA return instructions (``<path>.lora_merge_B/A``,
    ``<path>.lora_residual_B/A``) that every client folds into its frozen base weight. A client
    that builds its model from the pretrained base each round (a fresh process, a client sampled
    for the first time) needs the sum of every round's merges so far, sent as one pair of
    factors: ``[B_1 B_2] [A_1; A_2] = B_1 A_1 + B_2 A_2`` exactly. Its rank grows every round.
    """
    from fedlora.state_dict import BASE_MERGE_SUFFIXES

    out = dict(new)
    for b_suffix, a_suffix in BASE_MERGE_SUFFIXES:
        for k in [k for k in previous if k.endswith(b_suffix)]:
            a_k = k[: -len(b_suffix)] + a_suffix
            if a_k not in previous:
                continue
            B_old, A_old = previous[k], previous[a_k]
            if k in new and a_k in new:
                out[k] = torch.cat([B_old, new[k].to(B_old.dtype)], dim=1)
                out[a_k] = torch.cat([A_old, new[a_k].to(A_old.dtype)], dim=0)
            else:
                out[k], out[a_k] = B_old, A_old
    return out


class Download(NamedTuple):
    """What the server sends one client for a round: the state, the budget it trains under,
    the seed of its random choices (:func:`fedlora.local.client_seed`) and the hand-back."""

    state: dict[str, torch.Tensor]
    budget: Budget
    seed: int
    handback: dict[str, Any] | None


class Reply(NamedTuple):
    """One client's reply: its id, upload state and meta, weight; ``reason`` set when the
    framework layer already rejected it (an error reply, a record it could not decode)."""

    client: Any
    state: Mapping[str, torch.Tensor] | None
    weight: float | None
    meta: Any = None
    reason: str | None = None


@dataclass
class Outcome:
    """One round's result.

    Attributes:
        state: the new global state, or None when the round changed nothing.
        metrics: :func:`fedlora.aggregate`'s metrics (empty when it was not called).
        rejected: ``[(client, reason)]`` for every reply left out, at any stage.
        used: the clients whose uploads were aggregated.
        error: why the round changed nothing (one line), or None.
    """

    state: dict[str, torch.Tensor] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    rejected: list[tuple[Any, str]] = field(default_factory=list)
    used: list[Any] = field(default_factory=list)
    error: str | None = None


class Server:
    """The server of a federated run of one method (see the module docstring).

    Args:
        method: a registered method name or :class:`fedlora.methods.Method`.
        global_state: the global state before the first round.
        options: the run's :class:`fedlora.methods.ClientOptions` (global rank, heads, ...).
        budgets: each client's budget (a mapping ``client -> Budget or partial dict``, or a
            callable ``client -> ...``); clients without one get the run's full budget with
            ``steps`` local steps.
        seed: the run seed (sampling, per-round options, clients' seeds).
        steps: local steps of a client whose budget does not say.
        error: measure the aggregation error every round (:func:`fedlora.aggregate`'s
            ``error=True``; it costs).
        aggregate_options: keyword options for the method's rule.
        side: the method's client-side object for downloads (default: made here; the
            simulator shares the one its clients train with).
        aggregate_fn: replaces :func:`fedlora.aggregate` (same signature).
        dp: a :class:`fedlora.privacy.PrivateAggregator`: client-level DP replaces the method's
            rule (noised sums over public denominators, ε in the metrics every round).
    """

    def __init__(
        self,
        method: str | Method,
        global_state: Mapping[str, torch.Tensor],
        *,
        options: ClientOptions,
        budgets: Mapping[Any, Any] | Callable[[Any], Any] | None = None,
        seed: int = 0,
        steps: int = 1,
        error: bool = False,
        aggregate_options: Mapping[str, Any] | None = None,
        side: Client | None = None,
        aggregate_fn: Callable[..., tuple[dict, dict]] | None = None,
        dp: Any = None,
    ) -> None:
        self.method = get_method(method) if isinstance(method, str) else method
        if not isinstance(self.method, Method):
            raise TypeError(f"method must be a name or a Method, got {type(method).__name__}")
        if not isinstance(options, ClientOptions):
            raise TypeError(f"options must be a ClientOptions, got {type(options).__name__}")
        if not isinstance(global_state, Mapping) or not global_state:
            raise ValueError("global_state must be a non-empty dict of tensors")
        if budgets is not None and not (isinstance(budgets, Mapping) or callable(budgets)):
            raise TypeError(
                f"budgets must be a mapping or a callable, got {type(budgets).__name__}"
            )
        self.options, self.seed, self.steps, self.error = (
            options,
            int(seed),
            int(steps),
            bool(error),
        )
        self.budgets = budgets
        self.global_state = dict(global_state)
        self.aggregate_options = dict(aggregate_options or {})
        self.aggregate_fn = aggregate_fn
        self.dp = dp  # --- differential privacy (fedlora.privacy.PrivateAggregator)
        known = []
        for c, b in budgets.items() if isinstance(budgets, Mapping) else ():
            if b is not None and not isinstance(b, (Budget, Mapping)):
                raise TypeError(f"budget of client {c!r} must be a Budget or a dict, got {b!r}")
            known.append(b)
        self.side = side or self.method.client(
            options, [full_budget(options, b, self.steps) for b in known]
        )
        self.server_options: dict[str, Any] = {}
        self.asked: dict[Any, Budget] = {}
        self.round_idx: int | None = None

    # ---------------------------------------------------------------- budgets and downloads
    def sent(self, replies: Sequence[Reply]) -> tuple[list[Budget], list[dict[str, torch.Tensor]]]:
        """Per reply, the client's budget this round and the download it was sent (recomputed
        from :attr:`global_state`, once per distinct budget): what a server step that works on
        deltas (DP, secure aggregation) needs."""
        budgets = [self.asked.get(r.client) or self.budget(r.client) for r in replies]
        cache: dict[Budget, dict[str, torch.Tensor]] = {}
        for b in budgets:
            if b not in cache:
                cache[b] = self.side.download(self.global_state, b)
        return budgets, [cache[b] for b in budgets]

    def budget(self, client: Any) -> Budget:
        """The budget of ``client`` (its entry in ``budgets``, completed with the run's
        defaults)."""
        b = self.budgets
        found = b(client) if callable(b) and not isinstance(b, Mapping) else (b or {}).get(client)
        if found is not None and not isinstance(found, (Budget, Mapping)):
            raise TypeError(
                f"budget of client {client!r} must be a Budget or a dict, got {found!r}"
            )
        return full_budget(self.options, found, self.steps)

    def sample(self, round_idx: int, clients: Iterable[Any], per_round: int | None = None) -> list:
        """:func:`sample_clients` with the run's seed."""
        return sample_clients(self.seed, round_idx, list(clients), per_round)

    def handback(self) -> dict[str, Any] | None:
        """What every download of the next round carries besides the state (the method's
        client side decides: HAFL truncation's averaged scores), JSON-able, or None."""
        return self.side.handback()

    def client_seed(self, client: Any, round_idx: int) -> int:
        """:func:`fedlora.local.client_seed` of ``client`` (an int id as it is, any other id by
        a stable CRC of its text)."""
        from fedlora.local import client_seed

        ok = isinstance(client, int) and not isinstance(client, bool)
        return client_seed(self.seed, round_idx, client if ok else zlib.crc32(str(client).encode()))

    def download(self, client: Any, round_idx: int) -> Download:
        """What ``client`` receives for round ``round_idx``."""
        budget = self.budget(client)
        state = self.side.download(self.global_state, budget)
        return Download(state, budget, self.client_seed(client, round_idx), self.handback())

    def configure(self, round_idx: int, clients: Iterable[Any]) -> dict[Any, Download]:
        """Start round ``round_idx`` with ``clients``: their downloads (computed once per
        distinct budget), and the set of replies :meth:`aggregate` will accept."""
        self.round_idx = round_idx
        self.asked = {}
        cache: dict[Budget, dict[str, torch.Tensor]] = {}
        handback = self.handback()
        out = {}
        for c in clients:
            budget = self.budget(c)
            self.asked[c] = budget
            if budget not in cache:
                cache[budget] = self.side.download(self.global_state, budget)
            out[c] = Download(cache[budget], budget, self.client_seed(c, round_idx), handback)
        return out

    # ---------------------------------------------------------------- aggregation
    def round_options(self, round_idx: int) -> dict[str, Any]:
        """The rule's options for round ``round_idx``, later ones winning: the method's own
        server-side options (PreLort's / HAFL's aggregation ablations), what the client side
        asked for after the last round (HAFL's ``prev_scores``), the method's per-round options
        (FLoRA's restart seed), then ``aggregate_options``."""
        ro = self.method.round_options
        per_round = dict(ro(key(self.seed, round_idx, ROUND_TAG))) if ro is not None else {}
        own = dict(self.side.server_options())  # the method's server-side options (ablations)
        return {**own, **self.server_options, **per_round, **self.aggregate_options}

    def screen(self, replies: Sequence[Reply]) -> tuple[list[Reply], list[tuple[Any, str]]]:
        """The replies the server may aggregate, and ``(client, reason)`` for the others: a
        reply the framework rejected, from a client not asked this round, a second reply of
        a client, an upload above the client's budget."""
        ok, rejected, seen = [], [], set()
        for reply in replies:
            if not isinstance(reply, Reply):
                rejected.append((None, f"not a Reply: {type(reply).__name__}"))
                continue
            c = reply.client
            if reply.reason is not None:
                rejected.append((c, reply.reason))
            elif self.round_idx is not None and c not in self.asked:
                rejected.append((c, "not asked to train this round"))
            elif c in seen:
                rejected.append((c, "a second reply this round"))
            else:
                budget = self.asked.get(c) or self.budget(c)
                why = upload_over_budget(self.method, reply.state or {}, reply.meta, budget)
                if why is not None:
                    rejected.append((c, f"over budget: {why}"))
                else:
                    ok.append(reply)
            if c is not None:
                seen.add(c)
        return ok, rejected

    def aggregate(self, round_idx: int, replies: Sequence[Reply]) -> Outcome:
        """Aggregate round ``round_idx``'s replies into :attr:`global_state`; never raises for
        client input. On success the method's client side keeps what the next downloads need
        (:meth:`fedlora.methods.Client.after_aggregate`)."""
        if self.aggregate_fn is None:
            from fedlora.aggregation import aggregate as aggregate_fn
        else:
            aggregate_fn = self.aggregate_fn
        out = Outcome()
        ok, out.rejected = self.screen(replies)
        if not ok:
            if self.dp is not None:  # --- differential privacy: the round still counts
                out.metrics = self.dp.skip(round_idx)
            out.error = (
                f"round {round_idx + 1}: no usable client reply ({len(out.rejected)} rejected)"
                if out.rejected
                else f"round {round_idx + 1}: no client replied"
            )
            logger.error("%s; global state unchanged", out.error)
            self.round_idx = None
            return out
        states = [r.state for r in ok]
        weights = [r.weight for r in ok]
        metas = [r.meta if r.meta is not None else {} for r in ok]
        options = self.round_options(round_idx)
        if self.error:
            options.setdefault("error", True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "global state unchanged" is reported below
                if self.dp is not None:  # --- differential privacy
                    new_state, metrics = self.dp.aggregate(self, round_idx, ok)
                else:
                    new_state, metrics = aggregate_fn(
                        self.method.name, self.global_state, states, weights, metas, **options
                    )
        except Exception as e:  # a failed round must not stop the server loop
            out.error = f"round {round_idx + 1}: aggregation failed: {type(e).__name__}: {e}"
            logger.error("%s; global state unchanged", out.error)
            self.round_idx = None
            return out
        out.metrics = dict(metrics)
        bad = set()
        for entry in metrics.get("rejected", []) or []:
            k = entry.get("client") if isinstance(entry, Mapping) else entry
            where = entry.get("key") if isinstance(entry, Mapping) else None
            why = entry.get("reason", "rejected") if isinstance(entry, Mapping) else "rejected"
            c = ok[k].client if isinstance(k, int) and 0 <= k < len(ok) else k
            bad.add(k)
            out.rejected.append((c, f"{where}: {why}" if where else str(why)))
        out.used = [r.client for i, r in enumerate(ok) if i not in bad]
        self.round_idx = None
        if metrics.get("clients_used", len(ok)) == 0 or not out.used:
            out.error = f"round {round_idx + 1}: every client update was rejected"
            logger.error("%s; global state unchanged", out.error)
            return out
        out.state = dict(new_state)
        self.global_state = dict(new_state)
        self.server_options = dict(self.side.after_aggregate(out.metrics) or {})
        for c, why in out.rejected:
            logger.warning("round %d: update of client %s rejected: %s", round_idx + 1, c, why)
        return out

    def restore(
        self, global_state: Mapping[str, torch.Tensor], last_metrics: Mapping[str, Any] | None
    ) -> None:
        """Resume: set the global state and replay the client side's hand-back on the last
        recorded round's metrics (HAFL truncation's scores)."""
        self.global_state = dict(global_state)
        self.server_options = (
            dict(self.side.after_aggregate(last_metrics) or {}) if last_metrics else {}
        )
