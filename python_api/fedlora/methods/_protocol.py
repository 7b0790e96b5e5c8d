"""The method protocol (DESIGN §4.1): what one method module declares, and the client side base.

A method is ONE module ``fedlora/methods/<name>.py`` that defines ``METHOD = Method(...)``: its
layer kind, rank policy, server rule (``aggregate``), optional streaming hooks, client checks, the
flags the callers need, and ``client``, the class holding its client side. The simulator
(:mod:`fedlora.simulate`) and the Flower client (:mod:`fedlora.flower`) both drive that class, so a
method behaves the same everywhere. :func:`fedlora.methods.register` checks a ``Method`` against
this protocol when it is registered.

The client side works on adapter *slots* (DESIGN §2: ``C`` client slots per layer), so the same
object serves one client at a time (slot 0) or every client of a round in one batched pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

State = Mapping[str, torch.Tensor]

LAYERS = ("lora", "ravan")
RANK_POLICIES = ("equal", "prefix", "indexed")
BUDGET_FIELDS = ("rank", "heads", "components", "steps")


@dataclass(frozen=True)
class Budget:
    """What one client can afford: LoRA rank, Ravan heads, HAFL trainable components, local
    steps. A method reads only the fields it declares in :attr:`Method.budget_fields`."""

    rank: int
    heads: int
    components: int
    steps: int


@dataclass(frozen=True)
class ClientOptions:
    """The run-wide settings a client side reads (the simulator builds them from its config,
    a Flower ClientApp from its run config)."""

    rank: int = 8
    alpha: float = 16.0
    heads: int = 4
    head_score: str = "weight"
    hafl_score_steps: int = 1
    hafl_mode: str = "freeze"


class Client:
    """The client side of plain LoRA (FedIT, FLoRA, FedEx-LoRA, FLoRA-NA): download the global
    adapter, train every component, upload all of it. Methods subclass it and override hooks.

    The hooks, in the order a round calls them: ``download`` (what a client of ``budget``
    receives), ``prepare`` (load it into a slot and set what trains), ``pre_steps`` batches that
    only score, then ``scoring_done``; training steps with ``truncations`` (ranks to train the
    batch under at once) and ``after_backward``; finally ``upload`` (state and meta for
    :func:`fedlora.aggregate`). ``setup`` runs once per model, ``start_round`` once per group of
    clients trained together; ``after_aggregate`` once per round, after the server's rule.
    """

    def __init__(self, options: ClientOptions, budgets: Sequence[Budget]) -> None:
        self.options, self.budgets = options, list(budgets)

    def layer_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`fedlora.inject` (rank, alpha, heads...)."""
        return {"rank": self.options.rank, "alpha": self.options.alpha}

    def setup(self, model: nn.Module) -> None:
        """Once, after the adapters are injected (e.g. freeze parameters for the whole run)."""

    def start_round(self, model: nn.Module, round_idx: int) -> None:
        """At the start of every group of clients trained together."""

    def download(self, global_state: State, budget: Budget) -> dict[str, torch.Tensor]:
        """The state a client of ``budget`` receives from the server."""
        return dict(global_state)

    def prepare(self, model: nn.Module, slot: int, state: State, budget: Budget, seed: int) -> None:
        """Load the downloaded ``state`` into ``slot`` and choose what trains."""
        from fedlora.state_dict import adapter_layers, set_adapter_state_dict

        set_adapter_state_dict(model, dict(state), slot=slot)
        for _, layer in adapter_layers(model):  # everything trains
            if hasattr(layer, "set_trainable_heads"):
                layer.set_trainable_heads(None, slot)
            else:
                layer.set_trainable(None, slot)

    def truncations(self, budget: Budget) -> list[int] | None:
        """Ranks to train each batch under at once (PreLort); None: the slot's own rank."""
        return None

    def pre_steps(self, budget: Budget) -> int:
        """Batches run before training that only score (HAFL importance, Ravan gradients)."""
        return 0

    def after_backward(self, model: nn.Module, slots: list[int]) -> None:
        """After every backward pass, for the slots that took it."""

    def scoring_done(self, model: nn.Module, slot: int, budget: Budget, seed: int) -> None:
        """After the pre-steps of ``slot``: choose what trains."""

    def upload(
        self, model: nn.Module, slot: int, budget: Budget
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(state, meta)`` of ``slot`` after local training, for :func:`fedlora.aggregate`."""
        from fedlora.state_dict import get_adapter_state_dict

        return get_adapter_state_dict(model, slot=slot), {}

    def handback(self) -> dict[str, Any] | None:
        """What the server sends with every download besides the state, so that a client side
        built fresh for the round (a Flower ClientApp) knows what :meth:`after_aggregate` told
        the server's (HAFL truncation: the averaged scores that say where the downloaded
        components belong). JSON-able; the client passes it to its own ``after_aggregate``.
        Default: None."""
        return None

    def after_aggregate(self, metrics: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """After the server aggregated a round: ``metrics`` as :func:`fedlora.aggregate`
        returned them (or, when a run resumes, the last round's recorded row). The client side
        keeps what its next downloads need (HAFL truncation: the server's averaged scores) and
        may return keyword options for the next round's ``aggregate`` call (HAFL:
        ``prev_scores``). Default: a no-op returning None. A caller that never calls it (a
        Flower ClientApp built fresh each round) gets each method's first-round behaviour."""
        return None


@runtime_checkable
class ServerRule(Protocol):
    """``aggregate(global_state, client_states, weights, metas, **options)``: the new global
    state and extra metrics, from inputs :func:`fedlora.aggregate` has validated (weights
    normalised over the accepted clients). It builds its outputs from new tensors."""

    def __call__(
        self,
        global_state: dict[str, torch.Tensor],
        client_states: Sequence[State],
        weights: Sequence[float],
        metas: Sequence[Mapping[str, Any]],
        **options: Any,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...


@dataclass(frozen=True)
class Method:
    """One federated method: everything the API, the simulator and Flower need to know.

    Attributes:
        name: the registry name (``fedlora.aggregate(name, ...)``, ``--method name``).
        layer: ``"lora"`` or ``"ravan"``: the adapter :func:`fedlora.inject` builds.
        ranks: what client ranks the server accepts: ``"equal"`` (the global's), ``"prefix"``
            (``r_k ≤ R`` leading components), ``"indexed"`` (``r_k ≤ R`` placed by the meta).
        aggregate: the server rule (:class:`ServerRule`).
        client: the client-side class (a :class:`Client` subclass).
        check_client: ``(global_state, state, meta)`` raising
            :class:`fedlora.methods._common.ClientRejected` for a client the rule cannot take.
        stream_add, stream_result: the streaming form (:class:`fedlora.Aggregator`); both or
            neither.
        error_state: ``(global_state, state, meta) -> state``: the client's whole adapter for the
            aggregation error, when uploads may hold only some components (HAFL).
        changes_base: the server's result carries merges into the frozen base (FLoRA, FedEx).
        linear: every uploaded element enters the result linearly with a finite coefficient,
            so NaN/inf can be detected on the result and traced back only when present.
        optional_suffixes: key suffixes a client may omit (FFA-LoRA's frozen ``A``).
        indexed_suffixes: key suffixes whose uploads may hold only some of the global's leading
            entries (``[K, ...]`` with ``1 ≤ K ≤ n`` for a global ``[n, ...]``), placed by the
            meta, which ``check_client`` validates (Ravan's compact ``lora_H`` / ``lora_s``: the
            trained heads only). Other keys must match the global's shape (or the rank policy).
        budget_fields: which :class:`Budget` fields the client side reads.
        round_options: ``(round_seed) -> dict`` of ``aggregate`` options a round needs (FLoRA's
            seed for its restarted adapter).
        summary: one line for the CLI help and the README.
    """

    name: str
    layer: Literal["lora", "ravan"]
    ranks: Literal["equal", "prefix", "indexed"]
    aggregate: Callable[..., tuple[dict[str, torch.Tensor], dict[str, Any]]]
    client: type[Client] = Client
    check_client: Callable[[State, State, Mapping[str, Any]], None] | None = None
    stream_add: Callable[..., None] | None = None
    stream_result: Callable[..., tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None
    error_state: Callable[[State, State, Mapping[str, Any]], State] | None = None
    changes_base: bool = False
    linear: bool = False
    optional_suffixes: tuple[str, ...] = ()
    indexed_suffixes: tuple[str, ...] = ()
    budget_fields: tuple[str, ...] = ("steps",)
    round_options: Callable[[int], dict[str, Any]] | None = None
    summary: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        """True when the rule is an exact running sum usable with :class:`fedlora.Aggregator`."""
        return self.stream_add is not None


def check_method(method: Any) -> Method:
    """``method`` if it satisfies the protocol, else ``TypeError``/``ValueError`` naming what
    is missing or wrong."""
    if not isinstance(method, Method):
        raise TypeError(
            f"a method must be a fedlora.methods.Method, got {type(method).__name__}: define "
            "METHOD = Method(name=..., layer=..., ranks=..., aggregate=...) in its module"
        )
    where = f"method {method.name!r}"
    if not isinstance(method.name, str) or not method.name.isidentifier():
        raise ValueError(f"{where}: name must be a Python identifier, got {method.name!r}")
    if method.layer not in LAYERS:
        raise ValueError(f"{where}: layer must be one of {LAYERS}, got {method.layer!r}")
    if method.ranks not in RANK_POLICIES:
        raise ValueError(f"{where}: ranks must be one of {RANK_POLICIES}, got {method.ranks!r}")
    if not callable(method.aggregate):
        raise TypeError(f"{where}: aggregate (the server rule) must be callable")
    if not (isinstance(method.client, type) and issubclass(method.client, Client)):
        raise TypeError(f"{where}: client must be a subclass of fedlora.methods.Client")
    for name in ("check_client", "stream_add", "stream_result", "error_state", "round_options"):
        hook = getattr(method, name)
        if hook is not None and not callable(hook):
            raise TypeError(f"{where}: {name} must be callable or None")
    if (method.stream_add is None) != (method.stream_result is None):
        raise ValueError(f"{where}: stream_add and stream_result come together (or neither)")
    for name in ("optional_suffixes", "indexed_suffixes"):
        value = getattr(method, name)
        if not (isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)):
            raise TypeError(f"{where}: {name} must be a tuple of non-empty strings")
    if method.indexed_suffixes and method.check_client is None:
        raise ValueError(f"{where}: indexed_suffixes needs a check_client to validate placement")
    bad = [f for f in method.budget_fields if f not in BUDGET_FIELDS]
    if bad:
        raise ValueError(f"{where}: budget_fields must be among {BUDGET_FIELDS}, got {bad}")
    return method
