"""Configuration of a simulated federated experiment and the client budget spec.

Budget spec (``--budgets``): ``"uniform"`` (every client gets the global rank, all heads, all
components, ``local_steps``), ``"hetero"`` (ranks R/4, R/2, R; heads 1, h/2, h; components
R/4, R/2, R; cycled over clients), or explicit ``key=v1,v2,...`` items joined by ``;`` with keys
``rank``, ``heads``, ``components``, ``steps``; client ``k`` takes value ``k mod len(values)``.
Example: ``"rank=2,4,8;steps=5,3"``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from fedlora.aggregation import METHODS

ENGINES = ("sequential", "batched")
BUDGET_KEYS = ("rank", "heads", "components", "steps")


class ConfigError(ValueError):
    """A configuration that cannot run (the CLI prints it on one line and exits with code 2)."""


@dataclass(frozen=True)
class Budget:
    """What one client can afford: LoRA rank, Ravan heads, HAFL trainable components, steps."""

    rank: int
    heads: int
    components: int
    steps: int


@dataclass
class SimConfig:
    """Everything that defines a run; two runs with equal configs give equal numbers."""

    method: str = "fedit"
    clients: int = 10
    rounds: int = 5
    local_steps: int = 5
    batch_size: int = 8
    lr: float = 5e-3
    weight_decay: float = 0.0
    dirichlet_alpha: float = 0.3
    budgets: str = "uniform"
    rank: int = 8
    alpha: float = 16.0
    heads: int = 4
    head_score: str = "weight"
    hafl_score_steps: int = 1
    engine: str = "batched"
    seed: int = 0
    model: str | None = None
    data: str | None = None
    max_length: int = 32
    max_train_per_client: int | None = None
    max_test: int | None = 256
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])

    def validate(self) -> SimConfig:
        """Check every field; raise :class:`ConfigError` naming the option."""

        def positive(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {v!r}"
                )

        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        for name in (
            "clients",
            "rounds",
            "local_steps",
            "batch_size",
            "rank",
            "heads",
            "max_length",
        ):
            positive(name)
        if self.hafl_score_steps < 0:
            raise ConfigError(f"--hafl-score-steps must be >= 0, got {self.hafl_score_steps}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not self.dirichlet_alpha > 0:
            raise ConfigError(f"--dirichlet-alpha must be positive, got {self.dirichlet_alpha}")
        if self.head_score not in ("weight", "gradient", "random"):
            raise ConfigError(
                f"--head-score must be weight, gradient or random; got {self.head_score!r}"
            )
        if not self.target_modules:
            raise ConfigError("--target-modules must name at least one module")
        parse_budgets(self)
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def fingerprint(self) -> str:
        """Stable text of the config, to refuse resuming a different run (``rounds`` is left out:
        a finished run may be resumed for more rounds)."""
        data = self.to_json()
        data.pop("rounds")
        return json.dumps(data, sort_keys=True)


def parse_budgets(cfg: SimConfig) -> list[Budget]:
    """One :class:`Budget` per client from ``cfg.budgets`` (see the module docstring)."""
    spec = cfg.budgets.strip()
    R, h = cfg.rank, cfg.heads
    values: dict[str, list[int]] = {
        "rank": [R],
        "heads": [h],
        "components": [R],
        "steps": [cfg.local_steps],
    }
    if spec == "hetero":
        values.update(
            rank=[max(1, R // 4), max(1, R // 2), R],
            heads=[1, max(1, h // 2), h],
            components=[max(1, R // 4), max(1, R // 2), R],
        )
    elif spec != "uniform":
        for item in filter(None, (p.strip() for p in spec.split(";"))):
            key, sep, rest = item.partition("=")
            key = key.strip()
            if not sep or key not in BUDGET_KEYS:
                raise ConfigError(
                    f"--budgets: cannot parse {item!r}; expected uniform, hetero or "
                    f"key=v1,v2,... with key in {', '.join(BUDGET_KEYS)}"
                )
            try:
                nums = [int(v) for v in rest.split(",") if v.strip()]
            except ValueError:
                raise ConfigError(
                    f"--budgets: {key} values must be integers, got {rest!r}"
                ) from None
            if not nums or min(nums) < 1:
                raise ConfigError(f"--budgets: {key} needs positive integers, got {rest!r}")
            values[key] = nums
    limits = {"rank": R, "components": R, "heads": h}
    for key, limit in limits.items():
        if max(values[key]) > limit:
            what = "global rank --rank" if key != "heads" else "--heads"
            raise ConfigError(f"--budgets: {key} {max(values[key])} exceeds the {what} ({limit})")
    return [
        Budget(*(values[key][k % len(values[key])] for key in BUDGET_KEYS))
        for k in range(cfg.clients)
    ]
