"""What the server and the clients share: model, data, local training and evaluation.

The model is the embedded all-MiniLM-L6-v2 encoder (``fedlora.models.load_encoder``, offline)
with fedlora adapters injected into its attention projections and a linear classifier head; the
data set is the offline standard-library topic data set (``fedlora.data.build_stdlib_topics``),
split over the clients by a Dirichlet partition of the training labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fedlora
from fedlora.data import build_stdlib_topics, dirichlet_partition
from fedlora.methods import prefix
from fedlora.models import SequenceClassifier, load_encoder, tokenize

#: Methods this example's client implements (train every adapter tensor, or a rank prefix, or a
#: budget of Ravan heads). FLoRA/FedEx (base-weight merges), HAFL and PreLort need their own
#: client steps (see ``fedlora simulate``).
METHODS = ("fedit", "florana", "hetlora", "flexlora", "ravan")
#: The classifier head trains and is averaged with the adapters.
HEAD = ("classifier",)


@dataclass(frozen=True)
class Settings:
    """The run configuration (``[tool.flwr.app.config]`` of pyproject.toml)."""

    method: str = "fedit"
    rank: int = 8
    alpha: float = 16.0
    heads: int = 4
    target_modules: tuple[str, ...] = ("query", "value")
    model_path: str = ""
    local_steps: int = 5
    batch_size: int = 16
    lr: float = 2e-3
    max_length: int = 64
    max_per_class: int = 60
    dirichlet_alpha: float = 1.0
    max_test: int = 200
    seed: int = 0

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> Settings:
        """Read the hyphenated keys of a Flower run config (unknown keys are ignored)."""

        def get(key: str, default: Any) -> Any:
            return config.get(key, default)

        method = str(get("method", cls.method))
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} in this example, got {method!r}")
        return cls(
            method=method,
            rank=int(get("rank", cls.rank)),
            alpha=float(get("alpha", cls.alpha)),
            heads=int(get("heads", cls.heads)),
            target_modules=tuple(
                t.strip() for t in str(get("target-modules", "query,value")).split(",") if t.strip()
            ),
            model_path=str(get("model-path", "")),
            local_steps=int(get("local-steps", cls.local_steps)),
            batch_size=int(get("batch-size", cls.batch_size)),
            lr=float(get("lr", cls.lr)),
            max_length=int(get("max-length", cls.max_length)),
            max_per_class=int(get("max-per-class", cls.max_per_class)),
            dirichlet_alpha=float(get("dirichlet-alpha", cls.dirichlet_alpha)),
            max_test=int(get("max-test", cls.max_test)),
            seed=int(get("seed", cls.seed)),
        )


def parse_budgets(text: str, key: str) -> list[dict[str, int]] | None:
    """``"2,4,8"`` -> ``[{key: 2}, {key: 4}, {key: 8}]`` (node ``i`` in node-id order gets entry
    ``i``); an empty string means no per-client budget."""
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    if not values:
        return None
    return [{key: int(v)} for v in values]


# ------------------------------------------------------------------------------------- model
@lru_cache(maxsize=2)
def _encoder(path: str) -> tuple[nn.Module, Any]:
    return load_encoder(path or None)


@lru_cache(maxsize=4)
def build_model(settings: Settings, num_labels: int, role: str = "client") -> tuple[nn.Module, Any]:
    """The classifier with injected adapters (cached per process and ``role``; every use loads
    a state first, so reusing the module across rounds is safe)."""
    import copy

    encoder, tokenizer = _encoder(settings.model_path)
    model = SequenceClassifier(copy.deepcopy(encoder), num_labels)
    options: dict[str, Any]
    if settings.method == "ravan":
        options = {
            "heads": settings.heads,
            "rank": settings.rank,
            "scale": settings.alpha / settings.rank,
        }
    else:
        options = {"rank": settings.rank, "alpha": settings.alpha}
    fedlora.inject(
        model.encoder,
        settings.method,
        target_modules=list(settings.target_modules),
        seed=settings.seed,
        **options,
    )
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.02, generator=gen)
        model.classifier.bias.zero_()
    model.eval()  # no dropout: clients and server compute the same function
    return model, tokenizer


def initial_state(settings: Settings) -> dict[str, torch.Tensor]:
    """The global state of round 0: adapters at their shared-seed init plus the head."""
    model, _ = build_model(settings, load_data(settings)["num_classes"], "server")
    return fedlora.get_adapter_state_dict(model, modules_to_save=HEAD)


# ------------------------------------------------------------------------------------- data
@lru_cache(maxsize=2)
def _dataset(max_per_class: int, seed: int):
    return build_stdlib_topics(max_per_class=max_per_class, seed=seed)


def load_data(settings: Settings) -> dict[str, Any]:
    """``{"num_classes", "train": (texts, labels), "test": (texts, labels)}``."""
    ds = _dataset(settings.max_per_class, settings.seed)
    train = ds.subset(ds.indices("train"))
    test = ds.subset(ds.indices("test")[: settings.max_test])
    return {
        "num_classes": ds.num_classes,
        "train": (list(train.texts), list(train.labels)),
        "test": (list(test.texts), list(test.labels)),
    }


def client_data(settings: Settings, partition_id: int, num_partitions: int) -> tuple[list, list]:
    """Texts and labels of one client's Dirichlet partition of the training split."""
    texts, labels = load_data(settings)["train"]
    parts = dirichlet_partition(
        labels, num_partitions, settings.dirichlet_alpha, seed=settings.seed
    )
    idx = parts[partition_id]
    return [texts[i] for i in idx], [labels[i] for i in idx]


# ------------------------------------------------------------------------------------- train / eval
def train_local(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    labels: list[int],
    settings: Settings,
    seed: int,
) -> float:
    """``local_steps`` AdamW steps on random batches of the client's data; mean training loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(settings.local_steps):
        pick = torch.randint(len(texts), (min(settings.batch_size, len(texts)),), generator=gen)
        batch = tokenize(tokenizer, [texts[i] for i in pick], max_length=settings.max_length)
        y = torch.tensor([labels[i] for i in pick])
        loss = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(
    model: nn.Module, tokenizer: Any, texts: list[str], labels: list[int], settings: Settings
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` on the given examples."""
    correct, loss_sum = 0, 0.0
    for start in range(0, len(texts), 64):
        batch = tokenize(tokenizer, texts[start : start + 64], max_length=settings.max_length)
        y = torch.tensor(labels[start : start + 64])
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    n = max(1, len(texts))
    return correct / n, loss_sum / n


def upload(
    model: nn.Module, settings: Settings, rank: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state, meta)`` a client sends: all tensors, its rank prefix, or Ravan's ``s·H``."""
    if settings.method == "ravan":
        from fedlora.methods.ravan import client_update

        return client_update(model, modules_to_save=HEAD)
    state = fedlora.get_adapter_state_dict(model, modules_to_save=HEAD)
    if rank is not None and rank < settings.rank:
        return prefix.truncate(state, rank), {"rank": rank}
    return state, ({"rank": rank} if rank is not None else {})
