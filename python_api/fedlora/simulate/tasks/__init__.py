"""Tasks of ``fedlora simulate`` (DESIGN §6.1): what is learnt and how it is scored.

A task is one object holding everything the training loop must not know about: its data, its
model, its per-client loss over segments, its evaluation and its metric columns. The engines
(:mod:`fedlora.simulate.engine`) loop over rounds and clients and call these hooks; they never
branch on the task.

- ``classify`` (:mod:`.classify`): sentence classification with an encoder (the embedded
  all-MiniLM-L6-v2) on the standard-library topics, scored by accuracy.
- ``sft`` (:mod:`.sft`): instruction tuning of a causal LM (the embedded SmolLM2-135M-Instruct)
  on offline instruction data, scored by response perplexity, ROUGE-L and exact match.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class TaskSpec:
    """What the command line, the configuration and ``fedlora compare`` need to know about a
    task without importing it (the task object itself is made on demand by :func:`get_task`).

    Attributes:
        name: ``--task NAME``.
        factory: ``"module:Class"`` of the task object.
        summary: one line for the help.
        defaults: values of the config fields left None (``lr``, ``max_length``, ``max_test``,
            ``target_modules``; ``target_modules`` None: the model family's default).
        metric, metric_label: the metric the done line reports.
        embedded_model: what an unset ``--model`` loads (said in the start line).
        embedded_data: what an unset ``--data`` loads.
        model_names: names ``--model`` accepts besides folders (the embedded model's).
        causal_lm: the task fine-tunes a causal language model: the LLM data forms
            (built-in instruction sets, ``reasoning_gym:``, dataset folders), ``--system-prompt``,
            ``--data-split``, ``--data-columns`` and ``--quantize`` apply.
        embedded_hidden_size: the embedded model's hidden size when known without loading it
            (``fedlora compare --match comm``), else None (read from the model's config).
    """

    name: str
    factory: str
    summary: str
    defaults: Mapping[str, Any]
    metric: str
    metric_label: str
    embedded_model: str
    embedded_data: str
    model_names: tuple[str, ...] = ()
    causal_lm: bool = False
    embedded_hidden_size: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task to the registry (``--task spec.name``); returns it."""
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register_task takes a TaskSpec, got {type(spec).__name__}")
    if ":" not in spec.factory:
        raise ValueError(
            f"task {spec.name!r}: factory must be 'module:Class', got {spec.factory!r}"
        )
    _REGISTRY[spec.name] = spec
    return spec


def task_names() -> tuple[str, ...]:
    """The registered task names, in registration order."""
    return tuple(_REGISTRY)


def task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name``; ValueError listing the known tasks otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"task must be one of {', '.join(_REGISTRY)}; got {name!r}")
    return _REGISTRY[name]


register_task(
    TaskSpec(
        name="classify",
        factory="fedlora.simulate.tasks.classify:ClassifyTask",
        summary="an encoder and a label head (the default)",
        defaults={
            "lr": 5e-3,
            "max_length": 32,
            "max_test": 256,
            "target_modules": ["query", "value"],
        },
        metric="test_accuracy",
        metric_label="test accuracy",
        embedded_model="the embedded all-MiniLM-L6-v2",
        embedded_data="the standard-library topics",
    )
)
register_task(
    TaskSpec(
        name="sft",
        factory="fedlora.simulate.tasks.sft:SFTTask",
        summary="instruction tuning of a causal LM",
        defaults={"lr": 1e-3, "max_length": 256, "max_test": 64, "target_modules": None},
        metric="rouge_l",
        metric_label="ROUGE-L",
        embedded_model="smollm2 (the embedded SmolLM2-135M-Instruct)",
        embedded_data="arithmetic",
        model_names=("smollm2",),
        causal_lm=True,
        embedded_hidden_size=576,  # SmolLM2-135M (fedlora.testing.SMOLLM2_135M)
    )
)


def __getattr__(name: str) -> Any:
    if name == "TASKS":  # a view of the registry
        return task_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@runtime_checkable
class Batch(Protocol):
    """Encoded examples the engines slice and concatenate without knowing their fields."""

    def __len__(self) -> int: ...

    def take(self, idx: list[int] | torch.Tensor) -> Batch: ...

    def to(self, device: torch.device | str) -> Batch: ...


class Task(Protocol):
    """The hooks a task gives the engines (see the module docstring)."""

    name: str
    #: evaluation metrics in the order of metrics.csv (after ``round``)
    columns: tuple[str, ...]
    #: the metric ``fedlora compare`` ranks and tunes by (higher is better)
    primary: str
    #: curves.png panels: groups of ``(metric, label)`` drawn on one axis each
    panels: tuple[tuple[tuple[str, str], ...], ...]

    def load_data(self, cfg: Any) -> Any:
        """The data set: ``.train`` (whose ``.labels`` the partition splits) and ``.test``."""

    def build_model(
        self, cfg: Any, dataset: Any, num_slots: int, rule: Any, preloaded: Any = None
    ) -> tuple[nn.Module, Any]:
        """The model with ``num_slots`` adapter slots, on ``cfg``'s device, and its tokenizer."""

    def encode(self, tokenizer: Any, split: Any, cfg: Any, *, test: bool = False) -> Batch:
        """``split`` tokenized for training (or for evaluation, ``test``)."""

    def cat(self, batches: list[Batch]) -> Batch:
        """One batch of several, in order (segment ``t`` is ``batches[t]``)."""

    def segment_losses(
        self, model: nn.Module, batch: Batch, offsets: list[int]
    ) -> list[torch.Tensor]:
        """Mean loss of each segment ``batch[offsets[t]:offsets[t+1]]`` (autograd-connected)."""

    def evaluate(self, model: nn.Module, test: Batch, cfg: Any) -> dict[str, Any]:
        """The current slot-0 adapter's metrics on ``test`` (every name of ``columns``)."""

    def round_line(self, row: dict[str, Any]) -> str:
        """The metric part of a round's progress line."""

    def primary_available(self, cfg: Any) -> bool:
        """Whether ``cfg``'s runs compute the primary metric (SFT with ``max_generate`` 0
        generates nothing, so it has no ROUGE-L; ``fedlora compare`` then ranks by the loss)."""


def get_task(name: str) -> Task:
    """The task object of ``name`` (a registered :class:`TaskSpec`), made on demand."""
    module, cls = task_spec(name).factory.split(":")
    return getattr(importlib.import_module(module), cls)()


def model_device(model: nn.Module) -> torch.device:
    """The device the model's parameters live on."""
    return next(model.parameters()).device
