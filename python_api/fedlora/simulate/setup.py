"""What a run builds before its first round: data, model, encoded splits, partition.

:func:`setup_run` is the one place that turns a :class:`fedlora.simulate.SimConfig` into a
run's pieces; ``fedlora simulate``'s engines call it, and so can an FL framework's apps (the
Flower example's ServerApp and ClientApp do), so that every caller builds the same model (same
seeds, same adapter initialisation), the same encoded examples and the same per-client
partition, and a method gives the same numbers through each of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedlora.methods import Client
from fedlora.methods import get as get_method
from fedlora.simulate.config import Budget, ConfigError, SimConfig, parse_budgets
from fedlora.simulate.tasks import Batch, Task, get_task

__all__ = ["RunSetup", "partition", "setup_run"]


@dataclass
class RunSetup:
    """Everything a run builds before its first round.

    Attributes:
        task: the :class:`fedlora.simulate.tasks.Task` (its loss is a
            :class:`fedlora.local.SegmentLoss`).
        method: the :class:`fedlora.methods.Method`.
        rule: the method's client side, set up on ``model``.
        budgets: one :class:`fedlora.methods.Budget` per client (``cfg.budgets``).
        model: the model with its adapter slots (adapters at their seeded initialisation).
        train, test: the encoded training split and test side.
        parts: each client's example indices into ``train``.
        weights: each client's weight (its number of examples).
        data: how the splits were encoded (for the reports).
    """

    task: Task
    method: Any
    rule: Client
    budgets: list[Budget]
    model: nn.Module
    train: Batch
    test: Any
    parts: list[list[int]]
    weights: list[float]
    data: dict[str, Any] = field(default_factory=dict)


def partition(cfg: SimConfig, train: Batch) -> tuple[list[list[int]], list[float]]:
    """Clients' example indices (non-IID over the examples' categories, ``cfg.clients`` of
    them, Dirichlet ``cfg.dirichlet_alpha``, seeded by ``cfg.seed``, at most
    ``cfg.max_train_per_client`` each) and weights."""
    from fedlora.data import dirichlet_partition

    labels = train.categories.tolist()
    try:
        parts = dirichlet_partition(labels, cfg.clients, cfg.dirichlet_alpha, seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(f"--clients {cfg.clients}: {err}") from None
    if cfg.max_train_per_client:
        parts = [p[: cfg.max_train_per_client] for p in parts]
    return parts, [float(len(p)) for p in parts]


def setup_run(
    cfg: SimConfig,
    shared: dict | None = None,
    log: Callable[[str], None] = print,
    *,
    num_slots: int | None = None,
) -> RunSetup:
    """The data, the model with its slots, the encoded splits and the partition of ``cfg``.

    ``shared`` may hold a ``"dataset"`` and a ``"model"`` (the task's ``(model, tokenizer)``
    before injection) to reuse. ``num_slots``: adapter slots of the model (default: one per
    client of a round for the batched engine, else 1). Problems are one-line
    :class:`fedlora.simulate.ConfigError`\\ s."""
    task = get_task(cfg.task)
    budgets = parse_budgets(cfg)
    torch.manual_seed(cfg.seed)
    dataset = shared["dataset"] if shared and "dataset" in shared else task.load_data(cfg)
    method = get_method(cfg.method)
    rule = method.client(cfg.client_options(), budgets)
    if num_slots is None:
        per_round = cfg.clients_per_round or cfg.clients
        num_slots = per_round if cfg.engine == "batched" else 1
    preloaded = shared.get("model") if shared else None
    if cfg.quantize != "none":
        preloaded = _quantized_model(cfg, preloaded, log)
    model, tokenizer = task.build_model(cfg, dataset, num_slots, rule, preloaded)
    train = task.encode(tokenizer, dataset.train, cfg)
    test = task.encode(tokenizer, dataset.test, cfg, test=True)
    note = getattr(task, "data_note", lambda a, b: None)(train, test)
    if note:
        log(f"data: {note}")
    parts, weights = partition(cfg, train)
    data = {"name": getattr(dataset, "name", None), "clients": [len(p) for p in parts]}
    for split, enc in (("train", train), ("test", test)):
        stats = getattr(enc, "stats", None)
        data[split] = dict(stats) if stats else {"examples": len(enc)}
    return RunSetup(task, method, rule, budgets, model, train, test, parts, weights, data)


def _quantized_model(cfg: SimConfig, preloaded: Any, log: Callable[[str], None]) -> Any:
    """``--quantize``: the causal LM (``preloaded`` or loaded) with its decoder blocks' linear
    layers in 4/8 bits (:func:`fedlora.quantize.quantize_base`), for the task to inject into;
    the backend is tried on a tiny layer before the model loads."""
    from fedlora.models import load_causal_lm
    from fedlora.quantize import check_backend, quantize_base
    from fedlora.simulate.devices import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        check_backend(cfg.quantize, device, dtype)
    except ValueError as err:
        raise ConfigError(f"--quantize {cfg.quantize}: {err}") from None
    if preloaded is None:
        try:
            preloaded = load_causal_lm(cfg.model or "smollm2", dtype=dtype)
        except (ImportError, OSError, ValueError) as err:
            raise ConfigError(f"--model: {err}") from None
    lm, tokenizer = preloaded
    n = quantize_base(lm, cfg.quantize, dtype, device)
    log(f"quantize: {n} linear layers of the frozen base in {cfg.quantize} (bitsandbytes)")
    return lm, tokenizer
