"""The client side of every method, as the simulator drives it.

A :class:`ClientRule` says what a client downloads, how its slot is prepared (which components,
ranks or heads train), whether its batch is repeated (PreLort's nested truncations), what happens
after each backward pass (HAFL's importance averages) and what it uploads. The server side is
``fedlora.aggregate``. Rules work on slots, so the same code serves the sequential engine (one
slot) and the batched engine (one slot per client).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedlora.methods import prefix
from fedlora.simulate.config import Budget, SimConfig
from fedlora.state_dict import get_adapter_state_dict, set_adapter_state_dict


class ClientRule:
    """Plain LoRA client (FedIT, FLoRA-NA, FLoRA, FedEx-LoRA): download all, train all, upload all."""

    layer_kind = "lora"

    def __init__(self, cfg: SimConfig, budgets: list[Budget]) -> None:
        self.cfg, self.budgets = cfg, budgets

    def layer_options(self) -> dict[str, Any]:
        return {"rank": self.cfg.rank, "alpha": self.cfg.alpha}

    def setup(self, model: nn.Module) -> None:
        """Once, after the model is built (e.g. freeze parameters for the whole run)."""

    def start_round(self, model: nn.Module, round_idx: int) -> None:
        """At the start of every local-training group."""

    def download(
        self, global_state: dict[str, torch.Tensor], budget: Budget
    ) -> dict[str, torch.Tensor]:
        return global_state

    def prepare(
        self, model: nn.Module, slot: int, state: dict[str, torch.Tensor], budget: Budget, seed: int
    ) -> None:
        set_adapter_state_dict(model, state, slot=slot)
        for layer in _lora_layers(model):
            layer.set_trainable(None, slot)

    def truncations(self, budget: Budget) -> list[int] | None:
        """Ranks to train the batch under at once (PreLort); ``None``: the slot's own rank."""
        return None

    def pre_steps(self, budget: Budget) -> int:
        """Batches run before training that only score (HAFL importance, Ravan gradient score)."""
        return 0

    def after_backward(self, model: nn.Module, slots: list[int]) -> None:
        """After every backward pass, for the slots that took it."""

    def scoring_done(self, model: nn.Module, slot: int, budget: Budget, seed: int) -> None:
        """After the pre-steps of ``slot``: choose what trains."""

    def upload(
        self, model: nn.Module, slot: int, budget: Budget
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return get_adapter_state_dict(model, slot=slot), {}


def _lora_layers(model: nn.Module) -> list[Any]:
    from fedlora.layers.lora import LoRALinear

    return [m for m in model.modules() if isinstance(m, LoRALinear)]


class FFARule(ClientRule):
    """FFA-LoRA: A frozen at its shared-seed initialisation, only B trains and travels."""

    def setup(self, model: nn.Module) -> None:
        for layer in _lora_layers(model):
            layer.lora_A.requires_grad_(False)

    def upload(self, model, slot, budget):
        state = get_adapter_state_dict(model, slot=slot)
        return {k: v for k, v in state.items() if not k.endswith(prefix.A_SUFFIX)}, {}


class PrefixRule(ClientRule):
    """HetLoRA / FlexLoRA: client ``k`` trains the rank-``r_k`` prefix and uploads it."""

    def download(self, global_state, budget):
        return prefix.truncate(global_state, budget.rank)

    def upload(self, model, slot, budget):
        state = prefix.truncate(get_adapter_state_dict(model, slot=slot), budget.rank)
        return state, {"rank": budget.rank}


class FlexLoRARule(PrefixRule):
    """FlexLoRA: the server's global ΔW is re-factored at each client's rank (best rank-r_k).

    Where ΔW has fewer than ``r_k`` non-zero singular values (always in the first round, when
    ΔW = 0) the SVD gives components with ``A`` row and ``B`` column both zero, which can never
    train (each factor's gradient goes through the other). Those rows of ``A`` are refilled
    from the run's initial adapter, with ``B`` still zero, so the function is unchanged.
    """

    def setup(self, model):
        self.initial = get_adapter_state_dict(model, slot=0)

    def download(self, global_state, budget):
        from fedlora.methods import flexlora

        state = flexlora.client_factors(global_state, budget.rank)
        init = prefix.truncate(self.initial, budget.rank)
        for path in prefix.lora_paths(state):
            A, B = state[path + prefix.A_SUFFIX], state[path + prefix.B_SUFFIX]
            dead = (A.abs().sum(1) == 0) & (B.abs().sum(0) == 0)
            if bool(dead.any()):
                A = A.clone()
                A[dead] = init[path + prefix.A_SUFFIX][dead].to(A.dtype)
                state[path + prefix.A_SUFFIX] = A
        return state


class PreLortRule(PrefixRule):
    """PreLort: prefix download/upload and the nested-truncation loss over ``T_k``."""

    def truncations(self, budget):
        from fedlora.methods.prelort_client import truncation_set

        return truncation_set(budget.rank, [b.rank for b in self.budgets])


class HAFLRule(ClientRule):
    """HAFL freezing mode: score ``hafl_score_steps`` batches, then train the top-``m_k`` components."""

    def setup(self, model):
        from fedlora.methods.hafl_client import ImportanceTracker

        self.tracker = ImportanceTracker(model)
        self.selection: dict[int, dict[str, list[int]]] = {}

    def start_round(self, model, round_idx):
        self.tracker.reset()
        self.selection = {}

    def pre_steps(self, budget):
        return self.cfg.hafl_score_steps

    def after_backward(self, model, slots):
        self.tracker.update(slots)

    def scoring_done(self, model, slot, budget, seed):
        self.selection[slot] = self.tracker.select(budget.components, slot)

    def upload(self, model, slot, budget):
        from fedlora.methods.hafl_client import client_update

        scores = self.tracker.component_scores(slot)
        return client_update(model, self.selection[slot], scores, slot=slot)


class RavanRule(ClientRule):
    """Ravan: train ``K_c`` heads per layer chosen by ``--head-score``; upload ``s·H``."""

    layer_kind = "ravan"

    def layer_options(self):
        return {
            "heads": self.cfg.heads,
            "rank": self.cfg.rank,
            "scale": self.cfg.alpha / self.cfg.rank,
        }

    def prepare(self, model, slot, state, budget, seed):
        from fedlora.methods.ravan import ravan_layers, select_heads

        set_adapter_state_dict(model, state, slot=slot)
        for _, layer in ravan_layers(model):
            layer.set_trainable_heads(None, slot)
        if self.cfg.head_score != "gradient":
            select_heads(model, budget.heads, self.cfg.head_score, slot=slot, seed=seed)

    def pre_steps(self, budget):
        return 1 if self.cfg.head_score == "gradient" else 0

    def scoring_done(self, model, slot, budget, seed):
        from fedlora.methods.ravan import select_heads

        if self.cfg.head_score == "gradient":
            select_heads(model, budget.heads, "gradient", slot=slot, seed=seed)

    def upload(self, model, slot, budget):
        from fedlora.methods.ravan import client_update

        return client_update(model, slot=slot, modules_to_save=())


RULES: dict[str, type[ClientRule]] = {
    "fedit": ClientRule,
    "florana": ClientRule,
    "flora": ClientRule,
    "fedex": ClientRule,
    "ffa": FFARule,
    "hetlora": PrefixRule,
    "flexlora": FlexLoRARule,
    "prelort": PreLortRule,
    "hafl": HAFLRule,
    "ravan": RavanRule,
}


def make_rule(cfg: SimConfig, budgets: list[Budget]) -> ClientRule:
    """The client rule of ``cfg.method``."""
    return RULES[cfg.method](cfg, budgets)
