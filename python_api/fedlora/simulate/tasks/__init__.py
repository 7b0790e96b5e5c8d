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

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

TASKS: tuple[str, ...] = ("classify", "sft")


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
    """The task named ``name`` (one of :data:`TASKS`)."""
    if name == "classify":
        from fedlora.simulate.tasks.classify import ClassifyTask

        return ClassifyTask()
    if name == "sft":
        from fedlora.simulate.tasks.sft import SFTTask

        return SFTTask()
    raise ValueError(f"task must be one of {', '.join(TASKS)}; got {name!r}")


def model_device(model: nn.Module) -> torch.device:
    """The device the model's parameters live on."""
    return next(model.parameters()).device
