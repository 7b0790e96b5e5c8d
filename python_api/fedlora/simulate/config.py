"""Configuration of a simulated federated experiment and the client budget spec.

Budget spec (``--budgets``): ``"uniform"`` (every client gets the global rank, all heads, all
components, ``local_steps``), ``"hetero"`` (ranks R/4, R/2, R; heads 1, h/2, h; components
R/4, R/2, R; cycled over clients), or explicit ``key=v1,v2,...`` items joined by ``;`` with keys
``rank``, ``heads``, ``components``, ``steps``; client ``k`` takes value ``k mod len(values)``.
Example: ``"rank=2,4,8;steps=5,3"``. Each key at most once; an empty spec (``""``, ``";;"``)
is an error, not ``uniform``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from fedlora.methods import Budget, ClientOptions, names
from fedlora.simulate.errors import ConfigError

ENGINES = ("sequential", "batched")
TASKS = ("classify", "sft")
#: per-task defaults of the fields left None (see :meth:`SimConfig.__post_init__`)
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classify": {
        "lr": 5e-3,
        "max_length": 32,
        "max_test": 256,
        "target_modules": ["query", "value"],
    },
    "sft": {"lr": 1e-3, "max_length": 256, "max_test": 64, "target_modules": None},
}
#: fields added after checkpoints were first written: left out of the fingerprint at these
#: values, so runs checkpointed before they existed still resume
_LATER_FIELDS = {"task": "classify", "dtype": "auto", "clients_per_round": None,
                 "max_generate": 16, "max_new_tokens": 32}  # fmt: skip
# --- differential privacy: its fields at their defaults stay out of the fingerprint
_LATER_FIELDS |= {"dp_clip": None, "dp_noise": None, "dp_epsilon": None, "dp_delta": 1e-5,
                  "dp_weights": "uniform", "dp_weight_cap": None, "dp_denominator": "expected",
                  "dp_accountant": "rdp"}  # fmt: skip
HEAD_SCORES = ("weight", "gradient", "random")
HAFL_MODES = ("freeze", "truncate")
BUDGET_KEYS = ("rank", "heads", "components", "steps")
MAX_SEED = 2**32 - 1  # numpy's and the per-round key's range
MAX_COUNT = 10**6  # upper bound of every count option: far above any real run


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # a view of the method registry (fedlora.methods.names)
        return names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class SimConfig:
    """Everything that defines a run; two runs with equal configs give equal numbers.

    ``task`` is ``classify`` (an encoder and a label head) or ``sft`` (instruction tuning of a
    causal LM); ``lr``, ``max_length``, ``max_test`` and ``target_modules`` left None take the
    task's defaults (:data:`TASK_DEFAULTS`; ``target_modules`` None for ``sft`` means the
    model family's default projections). ``max_test`` 0 evaluates the whole test split.
    ``clients_per_round`` samples that many clients each round (None: all). ``device`` and
    ``dtype`` are where the run trains and the frozen base's precision
    (:mod:`fedlora.simulate.devices`); ``max_generate`` / ``max_new_tokens``: the SFT test
    prompts answered greedily each round and the answers' length limit.
    """

    task: str = "classify"
    method: str = "fedit"
    clients: int = 10
    rounds: int = 5
    local_steps: int = 5
    batch_size: int = 8
    lr: float | None = None
    weight_decay: float = 0.0
    dirichlet_alpha: float = 0.3
    budgets: str = "uniform"
    rank: int = 8
    alpha: float = 16.0
    heads: int = 4
    head_score: str = "weight"
    hafl_score_steps: int = 1
    hafl_mode: str = "freeze"
    engine: str = "batched"
    seed: int = 0
    model: str | None = None
    data: str | None = None
    max_length: int | None = None
    max_train_per_client: int | None = None
    max_test: int | None = None
    target_modules: list[str] | None = None
    clients_per_round: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_generate: int = 16
    max_new_tokens: int = 32
    # --- differential privacy (fedlora.simulate.privacy_run; off while dp_clip is None)
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_weights: str = "uniform"
    dp_weight_cap: float | None = None
    dp_denominator: str = "expected"
    dp_accountant: str = "rdp"

    def __post_init__(self) -> None:
        for name, value in TASK_DEFAULTS.get(self.task, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)

    def client_options(self) -> ClientOptions:
        """The settings the method's client side reads (:class:`fedlora.methods.ClientOptions`)."""
        return ClientOptions(
            rank=self.rank,
            alpha=self.alpha,
            heads=self.heads,
            head_score=self.head_score,
            hafl_score_steps=self.hafl_score_steps,
            hafl_mode=self.hafl_mode,
        )

    def validate(self) -> SimConfig:
        """Check every field; raise :class:`ConfigError` naming the option.

        Ranges: the counts (``clients``, ``rounds``, ``local_steps``, ``batch_size``, ``rank``,
        ``heads``) are integers in [1, 10**6], ``max_length`` in [2, 10**6] (and at most the
        model's positions, checked when it is loaded); ``hafl_score_steps`` is in [0, 10**6] and
        ``max_test`` (0 or None = the whole test split) an integer >= 0;
        ``max_train_per_client`` is None or positive; ``hafl_mode`` is ``freeze`` (HAFL
        clients hold rank R and train their top ``components``) or ``truncate`` (they hold
        their top ``rank`` components by the server's averaged scores); ``seed`` is in
        [0, 2**32); ``lr`` is finite in (0, 1] and ``weight_decay`` finite in [0, 1] (AdamW: larger values move or shrink every weight by more than itself
        per step); ``alpha`` (LoRA scale numerator) is finite and positive;
        ``dirichlet_alpha`` is positive (``inf`` = IID); ``model`` and ``data``, when given,
        name an existing folder / file.
        """
        for name in ("task", "method", "engine", "head_score", "hafl_mode", "budgets", "device"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise ConfigError(f"{_opt(name)} must be a string, got {v!r}")
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}; got {self.task!r}")
        from fedlora.simulate.devices import DTYPES, check_device_name

        check_device_name(self.device)
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.method not in names():
            raise ConfigError(f"--method must be one of {', '.join(names())}; got {self.method!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if self.head_score not in HEAD_SCORES:
            raise ConfigError(
                f"--head-score must be one of {', '.join(HEAD_SCORES)}; got {self.head_score!r}"
            )
        if self.hafl_mode not in HAFL_MODES:
            raise ConfigError(
                f"--hafl-mode must be one of {', '.join(HAFL_MODES)}; got {self.hafl_mode!r}"
            )
        for name in ("clients", "rounds", "local_steps", "batch_size", "rank", "heads"):
            _check_int(name, getattr(self, name), 1, MAX_COUNT)
        _check_int("max_length", self.max_length, 2, MAX_COUNT)  # [CLS] and [SEP] at least
        _check_int("hafl_score_steps", self.hafl_score_steps, 0, MAX_COUNT)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("max_test", self.max_test, 0)
        _check_int("max_generate", self.max_generate, 0, MAX_COUNT)
        _check_int("max_new_tokens", self.max_new_tokens, 1, MAX_COUNT)
        if self.clients_per_round is not None:
            _check_int("clients_per_round", self.clients_per_round, 1, MAX_COUNT)
            if self.clients_per_round > self.clients:
                raise ConfigError(
                    f"--clients-per-round {self.clients_per_round} exceeds --clients {self.clients}"
                )
        if self.max_train_per_client is not None:
            _check_int("max_train_per_client", self.max_train_per_client, 1)
        _check_float("lr", self.lr, 0.0, 1.0, low_open=True)
        _check_float("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_float("alpha", self.alpha, 0.0, math.inf, low_open=True)
        _check_float(
            "dirichlet_alpha", self.dirichlet_alpha, 0.0, math.inf, low_open=True, allow_inf=True
        )
        tm = self.target_modules
        if tm is None and self.task == "sft":
            tm = ["(model default)"]
        if isinstance(tm, str) or not isinstance(tm, (list, tuple)):
            raise ConfigError(f"--target-modules must be a list of module names, got {tm!r}")
        if not tm or not all(isinstance(t, str) and t.strip() for t in tm):
            raise ConfigError(f"--target-modules must name at least one module, got {tm!r}")
        dup = sorted({t for t in tm if list(tm).count(t) > 1})
        if dup:
            raise ConfigError(f"--target-modules names {', '.join(dup)} more than once")
        _check_path("model", self.model, want_dir=True, names=("smollm2",) * (self.task == "sft"))
        from fedlora.data import BUILTIN_SETS

        _check_path("data", self.data, want_dir=False, names=BUILTIN_SETS * (self.task == "sft"))
        parse_budgets(self)
        from fedlora.simulate import privacy_run  # --- differential privacy

        privacy_run.check(self)
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "max_test" in values and values["max_test"] is None:  # the old "whole test split"
            values["max_test"] = 0
        return cls(**values)

    def fingerprint(self) -> str:
        """Stable text of the config, to refuse resuming a different run (``rounds`` is left out:
        a finished run may be resumed for more rounds)."""
        data = self.to_json()
        data.pop("rounds")
        data.pop("device")  # a run may resume on another device (the last bits may differ)
        for name, default in _LATER_FIELDS.items():
            if data.get(name) == default:
                data.pop(name)
        if data.get("max_test") == 0:  # "the whole test split" was None before
            data["max_test"] = None
        return json.dumps(data, sort_keys=True)


def _opt(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _check_int(name: str, v: Any, low: int, high: int | None = None) -> None:
    """``v`` is an int (not a bool) in ``[low, high]``, else a :class:`ConfigError`."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{_opt(name)} must be an integer, got {v!r}")
    if v < low or (high is not None and v > high):
        want = "a positive integer" if low == 1 else f"an integer >= {low}"
        if high is not None:
            want += f" and <= {high}"
        raise ConfigError(f"{_opt(name)} must be {want}, got {v}")


def _check_float(
    name: str,
    v: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    allow_inf: bool = False,
) -> None:
    """``v`` is a real number in the range, finite unless ``allow_inf``, never NaN."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{_opt(name)} must be a number, got {v!r}")
    v = float(v)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ConfigError(f"{_opt(name)} must be a finite number, got {v}")
    too_low = v <= low if low_open else v < low
    if too_low or v > high:
        lo = "(" if low_open else "["
        hi = "inf)" if math.isinf(high) else f"{high:g}]"
        raise ConfigError(f"{_opt(name)} must be in {lo}{low:g}, {hi}, got {v:g}")


def _check_path(name: str, v: Any, *, want_dir: bool, names: tuple[str, ...] = ()) -> None:
    """``v`` is None, one of the built-in ``names``, or names an existing folder
    (``want_dir``) or file."""
    if v is None or (isinstance(v, str) and v in names):
        return
    if not isinstance(v, (str, os.PathLike)) or not str(v).strip():
        raise ConfigError(f"{_opt(name)} must be a path, got {v!r}")
    try:
        path = os.path.expanduser(os.fspath(v))
        exists, is_dir = os.path.exists(path), os.path.isdir(path)
    except (OSError, ValueError) as err:  # embedded NUL, name too long
        raise ConfigError(f"{_opt(name)} {str(v)!r}: {err}") from None
    kind = "folder" if want_dir else "file"
    if not exists:
        known = f" (nor one of {', '.join(names)})" if names else ""
        raise ConfigError(f"{_opt(name)} {str(v)!r} does not exist{known}")
    if is_dir != want_dir:
        raise ConfigError(f"{_opt(name)} {str(v)!r} is not a {kind}")


def parse_budgets(cfg: SimConfig) -> list[Budget]:
    """One :class:`Budget` per client from ``cfg.budgets`` (see the module docstring)."""
    if not isinstance(cfg.budgets, str):
        raise ConfigError(f"--budgets must be a string, got {cfg.budgets!r}")
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
        items = [p.strip() for p in spec.split(";") if p.strip()]
        if not items:
            raise ConfigError(
                f"--budgets: empty spec {cfg.budgets!r}; expected uniform, hetero or "
                f"key=v1,v2,... with key in {', '.join(BUDGET_KEYS)}"
            )
        seen: set[str] = set()
        for item in items:
            key, sep, rest = item.partition("=")
            key = key.strip()
            if not sep or key not in BUDGET_KEYS:
                raise ConfigError(
                    f"--budgets: cannot parse {item!r}; expected uniform, hetero or "
                    f"key=v1,v2,... with key in {', '.join(BUDGET_KEYS)}"
                )
            if key in seen:
                raise ConfigError(f"--budgets: {key} is given more than once in {cfg.budgets!r}")
            seen.add(key)
            texts = [v.strip() for v in rest.split(",")]
            if not rest.strip() or not all(texts):
                raise ConfigError(
                    f"--budgets: {key} needs comma-separated positive integers, got {rest!r}"
                )
            try:
                nums = [int(v) for v in texts]
            except ValueError:
                raise ConfigError(
                    f"--budgets: {key} values must be integers, got {rest!r}"
                ) from None
            if min(nums) < 1:
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
