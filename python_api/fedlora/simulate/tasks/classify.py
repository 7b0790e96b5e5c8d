"""``--task classify``: sentence classification with an encoder and a slotted linear head.

Default: the embedded all-MiniLM-L6-v2 on the standard-library topics (DESIGN §6), mean pooling
over real tokens, a linear head trained and averaged with the adapters. Scored by test accuracy
and mean cross-entropy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedlora.simulate.config import ConfigError, SimConfig
from fedlora.simulate.seeding import key
from fedlora.simulate.tasks import model_device

EVAL_BATCH = 64


@dataclass
class Tokenized:
    """A tokenized split: fixed-length ``input_ids`` / ``attention_mask`` ``[N, L]``, ``labels``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def categories(self) -> torch.Tensor:
        """What the partition splits clients over: the labels."""
        return self.labels

    def take(self, idx: list[int] | torch.Tensor) -> Tokenized:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Tokenized(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])

    def to(self, device: torch.device | str) -> Tokenized:
        return Tokenized(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device)
        )

    @staticmethod
    def cat(parts: list[Tokenized]) -> Tokenized:
        return Tokenized(
            torch.cat([p.input_ids for p in parts]),
            torch.cat([p.attention_mask for p in parts]),
            torch.cat([p.labels for p in parts]),
        )


def load_dataset(cfg: SimConfig):
    """The configured data set: ``--data`` file or the standard-library topics set."""
    from fedlora.data import build_stdlib_topics, load_text_file

    if cfg.data is None:
        return build_stdlib_topics()
    try:
        return load_text_file(cfg.data)
    except (ValueError, OSError) as err:
        raise ConfigError(f"--data: {err}") from None


def tokenize_split(
    tokenizer: Any, texts: list[str], labels: list[int], max_length: int
) -> Tokenized:
    """Texts padded and truncated to ``max_length`` tokens, with their labels."""
    try:
        enc = tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
    except (ValueError, TypeError) as err:  # e.g. a tokenizer without a padding token
        why = str(err).split(". ")[0][:200]
        raise ConfigError(f"--model: its tokenizer cannot encode the data ({why})") from None
    return Tokenized(
        enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels, dtype=torch.long)
    )


def build_model(cfg: SimConfig, num_labels: int, num_slots: int, rule: Any, encoder_and_tok=None):
    """Encoder with injected adapters (``num_slots`` slots) and a slotted classifier head, on
    the configured device (the frozen encoder in the configured dtype, the rest float32)."""
    from fedlora.injection import inject
    from fedlora.layers.head import SlottedLinear
    from fedlora.models import SequenceClassifier, load_encoder
    from fedlora.simulate.devices import adapters_to_float32, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if encoder_and_tok is None:
        try:
            encoder_and_tok = load_encoder(cfg.model)
        except (ImportError, OSError, ValueError) as err:
            raise ConfigError(f"--model: {err}") from None
    encoder, tokenizer = encoder_and_tok
    _check_max_length(cfg, encoder)
    model = SequenceClassifier(encoder, num_labels)
    gen = torch.Generator().manual_seed(key(cfg.seed, 7))
    head = nn.Linear(model.classifier.in_features, num_labels)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(head.in_features)
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    try:
        inject(
            model.encoder,
            cfg.method,
            target_modules=cfg.target_modules,
            seed=cfg.seed,
            num_clients=num_slots,
            **rule.layer_options(),
        )
    except ValueError as err:
        raise ConfigError(f"--target-modules: {err}") from None
    model.classifier = SlottedLinear(head, num_slots)
    model.eval()  # dropout off: the frozen base is deterministic, engines agree
    if dtype != torch.float32:
        model.encoder.to(dtype)
        adapters_to_float32(model)
    model.to(device)
    rule.setup(model)
    return model, tokenizer


def _check_max_length(cfg: SimConfig, encoder: nn.Module) -> None:
    """``--max-length`` fits the model's position embeddings (else round 1 fails indexing)."""
    limit = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.max_length > limit:
        raise ConfigError(f"--max-length {cfg.max_length} exceeds the model's {limit} positions")


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, data: Tokenized) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the slot-0 model on ``data``."""
    from fedlora.local import route_segments as set_segments

    set_segments(model, None, None)
    device = model_device(model)
    correct, loss_sum = 0, 0.0
    for start in range(0, len(data), EVAL_BATCH):
        part = data.take(list(range(start, min(start + EVAL_BATCH, len(data))))).to(device)
        logits = model(part.input_ids, part.attention_mask).float()
        loss_sum += float(F.cross_entropy(logits, part.labels, reduction="sum"))
        correct += int((logits.argmax(-1) == part.labels).sum())
    n = max(1, len(data))
    return correct / n, loss_sum / n


def evaluate(
    model: nn.Module, global_state: dict[str, torch.Tensor], data: Tokenized
) -> tuple[float, float]:
    """Accuracy and mean loss of the global adapter (loaded into slot 0) on ``data``."""
    from fedlora.state_dict import set_adapter_state_dict

    set_adapter_state_dict(model, global_state, slot=0)
    return accuracy_and_loss(model, data)


class ClassifyTask:
    """Sentence classification (see the module docstring)."""

    name = "classify"
    columns = ("test_accuracy", "test_loss")
    primary = "test_accuracy"
    panels = ((("test_accuracy", "test accuracy"),), (("test_loss", "test loss"),))

    def load_data(self, cfg: SimConfig) -> Any:
        return load_dataset(cfg)

    def build_model(
        self, cfg: SimConfig, dataset: Any, num_slots: int, rule: Any, preloaded: Any = None
    ) -> tuple[nn.Module, Any]:
        return build_model(cfg, dataset.num_classes, num_slots, rule, preloaded)

    def encode(self, tokenizer: Any, split: Any, cfg: SimConfig, *, test: bool = False):
        idx = list(range(len(split.labels)))
        if test:
            idx = idx[: cfg.max_test or None]
        texts = [split.texts[i] for i in idx]
        return tokenize_split(tokenizer, texts, [split.labels[i] for i in idx], cfg.max_length)

    def cat(self, batches: list[Tokenized]) -> Tokenized:
        return Tokenized.cat(batches)

    def segment_losses(
        self, model: nn.Module, batch: Tokenized, offsets: list[int]
    ) -> list[torch.Tensor]:
        logits = model(batch.input_ids, batch.attention_mask).float()
        return [
            F.cross_entropy(logits[a:b], batch.labels[a:b]) for a, b in itertools.pairwise(offsets)
        ]

    def evaluate(self, model: nn.Module, test: Tokenized, cfg: SimConfig) -> dict[str, Any]:
        acc, loss = accuracy_and_loss(model, test)
        return {"test_accuracy": acc, "test_loss": loss}

    def round_line(self, row: dict[str, Any]) -> str:
        return f"acc {row['test_accuracy']:.3f}  loss {row['test_loss']:.3f}"

    def primary_available(self, cfg: SimConfig) -> bool:
        return True
