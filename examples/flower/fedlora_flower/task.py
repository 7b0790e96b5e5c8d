"""What the ServerApp and the ClientApps share: the run's config, model, data and evaluation.

Everything here is built from public ``fedlora`` names, exactly as ``fedlora simulate`` builds
it, so a method gives the same numbers over Flower as in the simulator for the same seed:

- the run config (``[tool.flwr.app.config]`` plus ``--run-config``) becomes a
  :class:`fedlora.simulate.SimConfig` (:func:`sim_config`): ``task = "classify"`` (the embedded
  all-MiniLM-L6-v2 on the standard-library topics, accuracy) or ``task = "sft"`` (instruction
  tuning of a causal LM, by default the embedded SmolLM2-135M-Instruct on the built-in
  ``arithmetic`` set; ROUGE-L, exact match and perplexity); a key left at ``""`` or 0 takes the
  task's default; every training knob of ``fedlora simulate`` is a key (``lr-scheduler``,
  ``grad-accum``, ...), and so is every method option (``hetlora-prune = true``,
  ``prelort-training = "flat"``, ``hafl-aggregation = "zeropad"``: checked against the method);
- :func:`fedlora.simulate.setup_run` builds the model (adapters at their seeded
  initialisation), the encoded splits and the Dirichlet partition over ``num-partitions``
  clients (each node's ``partition-id`` is its client id);
- a ClientApp trains with :class:`fedlora.local.LocalClient` (the task is the loss), on batches
  drawn by :func:`fedlora.local.sample_batches`, seeded by :func:`fedlora.local.client_seed`;
- the server evaluates the global adapter with the task's own ``evaluate``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from functools import lru_cache
from typing import Any

import torch
from torch import nn

import fedlora
from fedlora.local import route_segments
from fedlora.methods import Budget, option_owners, prefix
from fedlora.methods import get as get_method
from fedlora.rounds import full_budget
from fedlora.simulate import SimConfig, setup_run

#: run-config keys that are not SimConfig fields (read by the apps themselves)
APP_KEYS = (
    "num-server-rounds",
    "num-nodes",
    "client-ranks",
    "client-heads",
    "fraction-train",
    "result-dir",
    "result-file",
)
#: run-config key -> SimConfig field, where the names differ
RENAMED = {"model-path": "model"}
#: SimConfig fields a run config does not set (a Flower run has its own)
NOT_SET = ("rounds", "clients", "engine", "clients_per_round")
#: fields whose "" or 0 in the run config means "the task's default" (None)
OPTIONAL = ("lr", "max_length", "max_test", "target_modules", "model", "data",
            "max_train_per_client", "max_grad_norm", "system_prompt")  # fmt: skip


def sim_config(run_config: dict[str, Any], num_partitions: int = 1) -> SimConfig:
    """The run config as a checked :class:`fedlora.simulate.SimConfig` of ``num_partitions``
    clients (``ValueError`` naming the key for a bad value; unknown keys are refused)."""
    fields = {f.name: f for f in dataclasses.fields(SimConfig)}
    method_opts = option_owners()  # method options (hetlora-prune, prelort-training, ...)
    kwargs: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for key, value in run_config.items():
        if key in APP_KEYS:
            continue
        name = RENAMED.get(key, key.replace("-", "_"))
        if name in method_opts and name not in fields:
            opt = method_opts[name][0]
            if opt.kind == "ints" and isinstance(value, str):  # "4,8" in a run config
                value = [int(v) for v in value.split(",") if v.strip()] if value.strip() else ()
            try:  # a key left at the option's default is not "given" (any method may run)
                given = opt.check(value) != opt.default
            except (TypeError, ValueError):
                given = True  # SimConfig.validate names the flag and what it expects
            if given:
                own[name] = value
            continue
        if name not in fields or name in NOT_SET or name == "method_options":
            known = sorted(
                [*APP_KEYS, *(k.replace("_", "-") for k in fields if k not in NOT_SET)]
                + [k.replace("_", "-") for k in method_opts if k not in fields]
            )
            raise ValueError(f"unknown run-config key {key!r}; known: {known}")
        if name in OPTIONAL and value in ("", 0, 0.0):
            continue
        if name == "target_modules":
            value = [t.strip() for t in str(value).split(",") if t.strip()]
        kwargs[name] = value
    specs = []
    for key, field in (("client-ranks", "rank"), ("client-heads", "heads")):
        text = str(run_config.get(key, "")).strip()
        if text:
            specs.append(f"{field}={text}")
    if specs:
        if kwargs.get("budgets", "uniform") != "uniform":
            raise ValueError("give per-node budgets by 'budgets' or 'client-ranks/heads', not both")
        kwargs["budgets"] = ";".join(specs)
    if own:
        kwargs["method_options"] = own
    cfg = SimConfig(**kwargs, clients=num_partitions, rounds=1, engine="sequential")
    return cfg.validate()


def fallback_budgets(cfg: SimConfig) -> list[dict[str, int]] | None:
    """The server's per-node budgets before a node declares its own (node ``i`` in ascending
    node-id order gets entry ``i``): the run config's ``budgets`` (``fedlora simulate``'s
    ``--budgets`` spec) or ``client-ranks`` / ``client-heads``; None for ``uniform``."""
    from fedlora.simulate import parse_budgets

    if cfg.budgets.strip() == "uniform":
        return None
    return [dataclasses.asdict(b) for b in parse_budgets(cfg)]


def node_budget(cfg: SimConfig, entries: dict[str, int]) -> Budget:
    """A node's full budget from the entries it has (its ``--node-config budget-*`` keys, else
    what the server sent): the run's defaults for the others (global rank, every head, every
    component, ``local-steps``)."""
    return full_budget(cfg.client_options(), entries, cfg.local_steps)


# ------------------------------------------------------------------------------------- the run
@lru_cache(maxsize=2)
def _setup(cfg_json: str) -> Any:
    cfg = SimConfig.from_json(json.loads(cfg_json))
    return setup_run(cfg, log=lambda line: None, num_slots=1)


def run_setup(cfg: SimConfig) -> Any:
    """:func:`fedlora.simulate.setup_run` for ``cfg`` (one slot), built once per process. Its
    ``model`` is never trained: take :func:`fresh_model` copies."""
    return _setup(json.dumps(cfg.to_json(), sort_keys=True))


def fresh_model(cfg: SimConfig) -> nn.Module:
    """A copy of the run's model as ``fedlora simulate`` builds it (pretrained base, adapters
    at their seeded initialisation)."""
    return copy.deepcopy(run_setup(cfg).model)


def initial_state(cfg: SimConfig) -> dict[str, torch.Tensor]:
    """The global state before round 1 (adapters at their seeded initialisation, and the
    classifier head of ``classify``)."""
    return fedlora.get_adapter_state_dict(run_setup(cfg).model, slot=0)


def client_side(cfg: SimConfig, ranks: list[int] | None) -> Any:
    """The method's client side; ``ranks`` are the distinct ranks of the run's clients (the
    server sends them: PreLort trains its nested loss under them)."""
    options = cfg.client_options()
    budgets = [node_budget(cfg, {"rank": int(r)}) for r in (ranks or [])]
    return get_method(cfg.method).client(options, budgets)


def fit_download(
    side: Any, cfg: SimConfig, state: dict[str, torch.Tensor], budget: Budget
) -> tuple[dict[str, torch.Tensor], Budget]:
    """Make the server's download and this node's budget agree on the rank.

    Before the server has heard a node's budget (the first round) it sends the download of its
    fallback budget. A node whose own rank is smaller takes its own download of what it got
    (the rank prefix; for FlexLoRA the leading factors of the rank-ordered SVD, the best rank-r
    ones); a node whose rank is larger trains the rank it received.
    """
    method = get_method(cfg.method)
    if method.layer != "lora" or method.ranks == "equal" or "rank" not in method.budget_fields:
        return state, budget
    if not prefix.lora_paths(state):
        return state, budget
    received = prefix.state_rank(state)
    if budget.rank < received and method.ranks == "prefix":
        return side.download(state, budget), budget
    if budget.rank != received:
        return state, dataclasses.replace(budget, rank=received)
    return state, budget


@torch.no_grad()
def evaluate(cfg: SimConfig, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The task's metrics of the global ``state`` (base merges folded into a fresh model's
    frozen base first): accuracy and loss, or perplexity, ROUGE-L and exact match."""
    s = run_setup(cfg)
    model = fresh_model(cfg)
    adapters = fedlora.apply_base_merges(model, dict(state))
    fedlora.set_adapter_state_dict(model, adapters, slot=0)
    route_segments(model, None)
    return s.task.evaluate(model, s.test, cfg)
