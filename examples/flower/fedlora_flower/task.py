"""What the server and the clients share: model, data, the method's client side, evaluation.

The model is the embedded all-MiniLM-L6-v2 encoder (``fedlora.models.load_encoder``, offline)
with fedlora adapters injected into its attention projections and a classifier head, built by
``fedlora simulate``'s own ``build_model``; the data set is the offline standard-library topic
data set (``fedlora.data.build_stdlib_topics``), split over the clients by a Dirichlet
partition of the training labels.

Local training is ``fedlora simulate``'s ``train_group`` on one client: the method's client
side (``fedlora.methods.get(method).client``) prepares the slot, runs its scoring steps, masks
what does not train and builds the upload, so every method behaves here as in the simulator.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

import fedlora
from fedlora.data import build_stdlib_topics, dirichlet_partition
from fedlora.methods import Budget, ClientOptions, names
from fedlora.methods import get as get_method
from fedlora.models import load_encoder
from fedlora.simulate import engine
from fedlora.simulate.config import SimConfig


@dataclass(frozen=True)
class Settings:
    """The run configuration (``[tool.flwr.app.config]`` of pyproject.toml)."""

    method: str = "fedit"
    rank: int = 8
    alpha: float = 16.0
    heads: int = 4
    head_score: str = "weight"
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
        if method not in names():
            raise ValueError(f"method must be one of {names()}, got {method!r}")
        return cls(
            method=method,
            rank=int(get("rank", cls.rank)),
            alpha=float(get("alpha", cls.alpha)),
            heads=int(get("heads", cls.heads)),
            head_score=str(get("head-score", cls.head_score)),
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

    def sim_config(self) -> SimConfig:
        """The same settings as a ``fedlora simulate`` config (what its loop reads)."""
        return SimConfig(
            method=self.method,
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            rank=self.rank,
            alpha=self.alpha,
            heads=self.heads,
            head_score=self.head_score,
            seed=self.seed,
            model=self.model_path or None,
            max_length=self.max_length,
            target_modules=list(self.target_modules),
        )

    def client_options(self) -> ClientOptions:
        """The run-wide settings the method's client side reads."""
        return self.sim_config().client_options()


def parse_budgets(text: str, key: str) -> list[dict[str, int]] | None:
    """``"2,4,8"`` -> ``[{key: 2}, {key: 4}, {key: 8}]`` (node ``i`` in node-id order gets entry
    ``i``); an empty string means no per-client budget."""
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    if not values:
        return None
    return [{key: int(v)} for v in values]


# ------------------------------------------------------------------------------------- budgets
def full_budget(settings: Settings, budget: dict[str, int]) -> Budget:
    """A :class:`fedlora.methods.Budget` from the entries a node has (the run's defaults for the
    others: full rank, every head, every component, ``local-steps``)."""
    return Budget(
        rank=min(budget.get("rank", settings.rank), settings.rank),
        heads=min(budget.get("heads", settings.heads), settings.heads),
        components=min(budget.get("components", settings.rank), settings.rank),
        steps=budget.get("steps", settings.local_steps),
    )


def client_side(settings: Settings, budget: Budget, ranks: list[int] | None) -> Any:
    """The method's client side for this client; ``ranks`` are the distinct ranks of the run's
    clients (the server sends them: PreLort trains its nested loss under them)."""
    budgets = [dataclasses.replace(budget, rank=int(r)) for r in (ranks or [])] + [budget]
    return get_method(settings.method).client(settings.client_options(), budgets)


def fit_download(
    side: Any, settings: Settings, state: dict[str, torch.Tensor], budget: Budget
) -> tuple[dict[str, torch.Tensor], Budget]:
    """Make the server's download and this client's budget agree on the rank.

    Before the server has heard a node's budget (the first round) it sends the download of its
    fallback budget. A node whose own rank is smaller takes its own download of what it got
    (the rank prefix; for FlexLoRA the leading factors of the rank-ordered SVD, the best
    rank-r ones); a node whose rank is larger trains the rank it received.
    """
    method = get_method(settings.method)
    if method.layer != "lora" or "rank" not in method.budget_fields:
        return state, budget
    from fedlora.methods import prefix

    if not prefix.lora_paths(state):
        return state, budget
    received = prefix.state_rank(state)
    if budget.rank < received:
        return side.download(state, budget), budget
    return state, dataclasses.replace(budget, rank=received)


# ------------------------------------------------------------------------------------- model
@lru_cache(maxsize=2)
def _encoder(path: str) -> tuple[nn.Module, Any]:
    return load_encoder(path or None)


def build_model(settings: Settings, num_labels: int, side: Any) -> tuple[nn.Module, Any]:
    """A fresh classifier with injected adapters (one slot) from the pretrained encoder, as
    ``fedlora simulate`` builds it (same seeds: every node and the server start equal)."""
    encoder, tokenizer = _encoder(settings.model_path)
    return engine.build_model(
        settings.sim_config(),
        num_labels,
        1,
        side,
        encoder_and_tok=(copy.deepcopy(encoder), tokenizer),
    )


def load_global(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold the base merges the server sends (FLoRA, FedEx-LoRA: every round's so far) into the
    fresh model's frozen base; returns the adapter state without them."""
    return fedlora.apply_base_merges(model, dict(state))


def initial_state(settings: Settings) -> dict[str, torch.Tensor]:
    """The global state of round 0: adapters at their shared-seed init plus the head."""
    side = client_side(settings, full_budget(settings, {}), None)
    model, _ = build_model(settings, load_data(settings)["num_classes"], side)
    return fedlora.get_adapter_state_dict(model)


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
    side: Any,
    state: dict[str, torch.Tensor],
    budget: Budget,
    data: tuple[list[str], list[int]],
    settings: Settings,
    server_round: int,
    client: int,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], float]:
    """One round of local training, ``fedlora simulate``'s loop on one client: the method's
    ``prepare``, scoring ``pre_steps``, ``budget.steps`` masked AdamW steps, ``upload``.
    Returns ``(state, meta, last training loss)``."""
    texts, labels = data
    tok = engine.tokenize_split(tokenizer, texts, labels, settings.max_length)
    steps = side.pre_steps(budget) + budget.steps
    batches = engine.client_batches(
        list(range(len(labels))), settings.batch_size, steps, settings.seed, server_round, client
    )
    seed = settings.seed * 1000 + server_round * 31 + client
    job = engine.ClientJob(client, budget, batches, state, seed)
    uploads, losses = engine.train_group(
        model, side, [job], tok, settings.sim_config(), server_round
    )
    (upload, meta), loss = uploads[0], losses[0]
    return upload, meta, float(loss)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: Any,
    state: dict[str, torch.Tensor],
    texts: list[str],
    labels: list[int],
    settings: Settings,
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of the global ``state`` on the given examples."""
    tok = engine.tokenize_split(tokenizer, texts, labels, settings.max_length)
    return engine.evaluate(model, load_global(model, state), tok)
