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


OPTION_KINDS = ("int", "float", "str", "bool", "ints")


@dataclass(frozen=True)
class Option:
    """One option a method owns (as PEFT's per-tuner config fields): the CLI flag
    ``--<name with dashes>``, the config key ``name`` and how a value is checked.

    Attributes:
        name: a Python identifier, unique over all methods' options (prefix it with the method's
            name, e.g. ``prelort_training``, unless it is shared on purpose such as ``heads``).
        kind: ``"int"``, ``"float"``, ``"str"``, ``"bool"`` or ``"ints"`` (a comma list of
            positive integers, e.g. a truncation set; ``()`` is its "not given" default).
        default: the value when the option is not given.
        help: one line for ``--help``.
        choices: the allowed values of a ``"str"`` option.
        low, high: inclusive bounds of a number (``"ints"``: of each entry).
        server: the keyword of the method's ``aggregate`` this option is passed as (None: the
            option is read by the client side only).
    """

    name: str
    kind: str
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    server: str | None = None

    @property
    def flag(self) -> str:
        """The CLI flag, ``--hafl-mode`` for ``hafl_mode``."""
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str) -> Any:
        """The value of the CLI text ``text`` (``ValueError`` naming the flag if it does not
        parse); :meth:`check` still applies."""
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
            if self.kind == "bool":
                low = text.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            if self.kind == "ints":
                return tuple(int(p) for p in text.split(",") if p.strip())
        except ValueError:
            want = {"int": "an integer", "float": "a number", "bool": "true or false",
                    "ints": "a comma list of integers"}[self.kind]  # fmt: skip
            raise ValueError(f"{self.flag} must be {want}, got {text!r}") from None
        return text

    def check(self, value: Any) -> Any:
        """``value`` if it is valid for this option (ints as ints, floats as floats, a list of
        ints as a sorted tuple), else ``ValueError``/``TypeError`` naming the flag."""
        f = self.flag
        if self.kind == "str":
            if not isinstance(value, str):
                raise TypeError(f"{f} must be a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"{f} must be one of {', '.join(self.choices)}; got {value!r}")
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{f} must be true or false, got {value!r}")
            return value
        if self.kind == "ints":
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise TypeError(f"{f} must be a list of integers, got {value!r}")
            items = [self._number(v, int) for v in value]
            if len(set(items)) != len(items):
                raise ValueError(f"{f} repeats a value: {list(value)}")
            return tuple(sorted(items))
        return self._number(value, int if self.kind == "int" else float)

    def _number(self, v: Any, cast: type) -> Any:
        import math

        f = self.flag
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (cast is int and v != int(v)):
            what = "an integer" if cast is int else "a number"
            raise TypeError(f"{f} must be {what}, got {v!r}")
        v = cast(v)
        if not math.isfinite(v):
            raise ValueError(f"{f} must be finite, got {v}")
        if (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
            if cast is int and self.low is not None:
                want = "a positive integer" if self.low == 1 else f"an integer >= {int(self.low)}"
                want += "" if self.high is None else f" and <= {int(self.high)}"
                raise ValueError(f"{f} must be {want}, got {v}")
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            raise ValueError(f"{f} must be in [{lo}, {hi}], got {v:g}")
        return v


@dataclass(frozen=True)
class ClientOptions:
    """The run-wide settings a client side reads (the simulator builds them from its config,
    a Flower ClientApp from its run config). ``method_options``: the method's own options
    (:attr:`Method.options`) by name, defaults filled in by :meth:`Method.option_values`; a
    client side reads them with :meth:`Client.option` (the fields ``heads``, ``head_score``,
    ``hafl_score_steps``, ``hafl_mode`` predate it and stay here)."""

    rank: int = 8
    alpha: float = 16.0
    heads: int = 4
    head_score: str = "weight"
    hafl_score_steps: int = 1
    hafl_mode: str = "freeze"
    method_options: Mapping[str, Any] = field(default_factory=dict)


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

    #: the method's options (:attr:`Method.options`), set by each method's client class so the
    #: client side finds its defaults without a registry look-up
    OPTIONS: tuple[Option, ...] = ()

    def __init__(self, options: ClientOptions, budgets: Sequence[Budget]) -> None:
        self.options, self.budgets = options, list(budgets)

    def option(self, name: str) -> Any:
        """The value of the method option ``name``: ``options.method_options``, else the
        :class:`ClientOptions` field of that name, else the option's declared default."""
        given = self.options.method_options
        if name in given:
            return given[name]
        if hasattr(self.options, name):
            return getattr(self.options, name)
        for opt in self.OPTIONS:
            if opt.name == name:
                return opt.default
        raise KeyError(f"{type(self).__name__} has no option {name!r}")

    def server_options(self) -> dict[str, Any]:
        """Keyword options for the method's ``aggregate`` from the options marked ``server``
        (PreLort's ``aggregation``, HAFL's ``aggregation``), e.g. ``{"aggregation": "zeropad"}``."""
        return {o.server: self.option(o.name) for o in self.OPTIONS if o.server}

    def passes(self, budget: Budget) -> int:
        """Forward/backward passes of one batch this client takes in a round: every step
        (scoring ones included) times the copies it trains at once (PreLort's truncations)."""
        truncs = self.truncations(budget)
        return (self.pre_steps(budget) + budget.steps) * (len(truncs) if truncs else 1)

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


def lora_upload_numel(budget: Budget, shape: tuple[int, int], options: ClientOptions) -> int:
    """A rank-``budget.rank`` LoRA pair of a ``[d_out, d_in]`` layer: ``rank · (d_in + d_out)``
    numbers (FedIT and every method that uploads whole factors)."""
    d_out, d_in = shape
    return budget.rank * (d_in + d_out)


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
        options: the options the method owns (:class:`Option`): the CLI flags, config keys and
            checks are derived from them; ``Client.option(name)`` reads their values.
        check_options: ``(values, given) -> None`` raising ``ValueError`` (one line, naming the
            flags) for a meaningless combination; ``values`` has every option (defaults filled),
            ``given`` only those set explicitly.
        default_lr: the learning rate per task (``{"sft": 1e-2}``) when none is given; a task
            it does not name takes the task's default.
        upload_numel: ``(budget, (d_out, d_in), options) -> int``: numbers one client of
            ``budget`` uploads for one adapted ``[d_out, d_in]`` layer (the one definition of
            upload size that ``fedlora compare --match comm`` sizes budgets by); default: a
            rank-``budget.rank`` LoRA pair, ``rank · (d_in + d_out)``.
        logged: keys of ``aggregate``'s metrics the simulator records in every round's row
            (plain JSON values: PreLort's and HetLoRA's ``segment_norms``).
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
    options: tuple[Option, ...] = ()
    check_options: Callable[[Mapping[str, Any], Mapping[str, Any]], None] | None = None
    default_lr: Mapping[str, float] = field(default_factory=dict)
    upload_numel: Callable[[Budget, tuple[int, int], ClientOptions], int] = lora_upload_numel
    logged: tuple[str, ...] = ()

    @property
    def streaming(self) -> bool:
        """True when the rule is an exact running sum usable with :class:`fedlora.Aggregator`."""
        return self.stream_add is not None

    def option(self, name: str) -> Option:
        """The option ``name`` (``KeyError`` if the method has none)."""
        for opt in self.options:
            if opt.name == name:
                return opt
        raise KeyError(name)

    def option_values(
        self, given: Mapping[str, Any] | None = None, base: Any = None
    ) -> dict[str, Any]:
        """Every option of the method: ``given`` (checked), else the attribute of ``base`` of
        that name (a :class:`ClientOptions` or a simulator config holding the older fields
        ``heads``, ``head_score``, ``hafl_mode``, ``hafl_score_steps``), else the default; then
        :attr:`check_options` on the combination. An option the method does not own is a
        ``ValueError`` naming its flag and the method's options."""
        given = dict(given or {})
        own = {o.name for o in self.options}
        unknown = sorted(set(given) - own)
        if unknown:
            flags = ", ".join("--" + n.replace("_", "-") for n in unknown)
            has = ", ".join(o.flag for o in self.options) or "none"
            raise ValueError(
                f"{flags}: method {self.name} takes no such option (its options: {has})"
            )
        values = {}
        for opt in self.options:
            if opt.name in given:
                values[opt.name] = opt.check(given[opt.name])
            elif base is not None and hasattr(base, opt.name):
                values[opt.name] = opt.check(getattr(base, opt.name))
            else:
                values[opt.name] = opt.default
        if self.check_options is not None:
            self.check_options(values, {k: values[k] for k in given})
        return values

    def label(self, values: Mapping[str, Any] | None = None) -> str:
        """The method's name, with every option that differs from its default named after it
        (``hetlora (hetlora_prune=True)``): what a table calls this variant."""
        values = values or {}
        diff = [
            f"{o.name}={_show(values[o.name])}"
            for o in self.options
            if o.name in values and values[o.name] != o.default
        ]
        return self.name + (f" ({', '.join(diff)})" if diff else "")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


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
    for opt in method.options:
        if not isinstance(opt, Option) or not opt.name.isidentifier():
            raise TypeError(f"{where}: options must be Option objects with identifier names")
        if opt.kind not in OPTION_KINDS:
            raise ValueError(
                f"{where}: option {opt.name} has kind {opt.kind!r}, not in {OPTION_KINDS}"
            )
        if opt.kind == "str" and not opt.choices:
            raise ValueError(f"{where}: option {opt.name} (a string) needs its choices")
    if len({o.name for o in method.options}) != len(method.options):
        raise ValueError(f"{where}: two options share a name")
    bad_lr = {t: v for t, v in dict(method.default_lr).items()
              if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1}  # fmt: skip
    if bad_lr:
        raise ValueError(f"{where}: default_lr must be rates in (0, 1], got {bad_lr}")
    bad = [f for f in method.budget_fields if f not in BUDGET_FIELDS]
    if bad:
        raise ValueError(f"{where}: budget_fields must be among {BUDGET_FIELDS}, got {bad}")
    return method
