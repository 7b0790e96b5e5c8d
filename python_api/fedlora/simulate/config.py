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
from dataclasses import dataclass, field
from typing import Any

from fedlora.methods import Budget, ClientOptions, names, option_owners
from fedlora.methods import get as get_method
from fedlora.simulate.errors import ConfigError

ENGINES = ("sequential", "batched")
#: fields added after checkpoints were first written: left out of the fingerprint at these
#: values, so runs checkpointed before they existed still resume
_LATER_FIELDS = {"task": "classify", "dtype": "auto", "clients_per_round": None,
                 "max_generate": 16, "max_new_tokens": 32, "init_adapter": None,
                 "method_options": {}, "system_prompt": None, "data_split": None,
                 "data_columns": None, "lr_scheduler": "constant", "warmup_steps": 0,
                 "warmup_ratio": 0.0, "max_grad_norm": None, "grad_accum": 1,
                 "lora_dropout": 0.0, "eval_every": 1, "quantize": "none"}  # fmt: skip
#: method options that predate per-method options and stay config fields (their spec, checks and
#: flags come from the owning method, :attr:`fedlora.methods.Method.options`)
OPTION_FIELDS = ("heads", "head_score", "hafl_score_steps", "hafl_mode")
#: fields that change how a run computes or logs, never what it computes (up to the last bits):
#: left out of the fingerprint, so a run may resume under another memory budget or logger
_HOW_FIELDS = ("device", "max_tokens_per_pass", "gradient_checkpointing", "report_to")
REPORT_TO = ("none", "tensorboard")
# --- differential privacy: its fields at their defaults stay out of the fingerprint
_LATER_FIELDS |= {"dp_clip": None, "dp_noise": None, "dp_epsilon": None, "dp_delta": 1e-5,
                  "dp_weights": "uniform", "dp_weight_cap": None, "dp_denominator": "expected",
                  "dp_accountant": "rdp"}  # fmt: skip
# --- simulated secure aggregation: the same
_LATER_FIELDS |= {"secagg": False, "secagg_clipping_range": 8.0,
                  "secagg_quantization_range": 2**22}  # fmt: skip
BUDGET_KEYS = ("rank", "heads", "components", "steps")
MAX_SEED = 2**32 - 1  # numpy's and the per-round key's range
MAX_COUNT = 10**6  # upper bound of every count option: far above any real run


def __getattr__(name: str) -> Any:
    if name in ("TASKS", "TASK_DEFAULTS"):  # views of the task registry
        from fedlora.simulate.tasks import task_names, task_spec

        if name == "TASKS":
            return task_names()
        return {t: dict(task_spec(t).defaults) for t in task_names()}
    if name == "METHODS":  # a view of the method registry (fedlora.methods.names)
        return names()
    if name in ("HEAD_SCORES", "HAFL_MODES"):  # views of the owning methods' option specs
        owners = option_owners()
        return owners["head_score" if name == "HEAD_SCORES" else "hafl_mode"][0].choices
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class SimConfig:
    """Everything that defines a run; two runs with equal configs give equal numbers.

    ``task`` is ``classify`` (an encoder and a label head) or ``sft`` (instruction tuning of a
    causal LM); ``lr``, ``max_length``, ``max_test`` and ``target_modules`` left None take the
    task's defaults (:attr:`fedlora.simulate.tasks.TaskSpec.defaults`; ``target_modules`` None for ``sft`` means the
    model family's default projections). ``max_test`` 0 evaluates the whole test split.
    ``lr`` None takes the method's default for the task (:attr:`fedlora.methods.Method.default_lr`)
    before the task's. ``method_options``: the method's own options by name (PreLort's
    ``prelort_training``, HetLoRA's ``hetlora_prune``, ...: ``Method.options``); the older
    method options ``heads``, ``head_score``, ``hafl_score_steps`` and ``hafl_mode`` stay fields
    (:data:`OPTION_FIELDS`), checked by their method's spec.
    ``clients_per_round`` samples that many clients each round (None: all). ``device`` and
    ``dtype`` are where the run trains and the frozen base's precision
    (:mod:`fedlora.simulate.devices`); ``max_generate`` / ``max_new_tokens``: the SFT test
    prompts answered greedily each round and the answers' length limit. ``init_adapter``: a PEFT
    LoRA folder the run starts from (:func:`fedlora.export.peft_adapter_state`; None: the
    method's own initialisation). ``system_prompt``
    (sft) is a system message put first in every conversation, through the chat template, in
    training and in evaluation (examples with their own system turn keep it).
    ``data_split`` and ``data_columns`` (sft) read a local Hugging Face dataset or a user file:
    the split to use, and which column holds each field (``{"instruction": "question"}``;
    :data:`fedlora.data.COLUMN_FIELDS`).

    Training knobs (:class:`fedlora.local.TrainOptions`): ``lr_scheduler`` with
    ``warmup_steps`` / ``warmup_ratio`` (per client over its local steps of a round),
    ``max_grad_norm`` (None: no clipping), ``grad_accum`` (micro-batches per batch),
    ``lora_dropout``; ``max_tokens_per_pass`` (0: automatic) and ``gradient_checkpointing``
    bound the memory. ``eval_every``: evaluate every N-th round (and the last); ``report_to``:
    ``none`` or ``tensorboard`` (event files in ``OUT/tensorboard``). ``quantize``: ``none``,
    ``4bit`` or ``8bit`` frozen base (QLoRA, :mod:`fedlora.quantize`; ``--task sft``).
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
    init_adapter: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None
    data_split: str | None = None
    data_columns: dict[str, str] | None = None
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = None
    grad_accum: int = 1
    lora_dropout: float = 0.0
    max_tokens_per_pass: int = 0
    gradient_checkpointing: bool = False
    eval_every: int = 1
    report_to: str = "none"
    quantize: str = "none"
    # --- differential privacy (fedlora.simulate.privacy_run; off while dp_clip is None)
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_weights: str = "uniform"
    dp_weight_cap: float | None = None
    dp_denominator: str = "expected"
    dp_accountant: str = "rdp"
    # --- simulated secure aggregation (fedlora.simulate.privacy_run; --secagg)
    secagg: bool = False
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 2**22

    def __post_init__(self) -> None:
        if self.lr is None and isinstance(self.method, str) and self.method in names():
            self.lr = get_method(self.method).default_lr.get(self.task)
        from fedlora.simulate.tasks import task_names, task_spec

        defaults = task_spec(self.task).defaults if self.task in task_names() else {}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)

    def train_options(self) -> dict[str, Any]:
        """The knobs of :func:`fedlora.local.train_slots` (keyword arguments)."""
        return {
            "lr_scheduler": self.lr_scheduler,
            "warmup_steps": self.warmup_steps,
            "warmup_ratio": float(self.warmup_ratio),
            "max_grad_norm": None if self.max_grad_norm is None else float(self.max_grad_norm),
            "grad_accum": self.grad_accum,
            "lora_dropout": float(self.lora_dropout),
            "max_tokens_per_pass": self.max_tokens_per_pass or None,
            "gradient_checkpointing": self.gradient_checkpointing,
        }

    def client_options(self) -> ClientOptions:
        """The settings the method's client side reads (:class:`fedlora.methods.ClientOptions`),
        with every option of the method resolved in ``method_options``."""
        return ClientOptions(
            rank=self.rank,
            alpha=self.alpha,
            heads=self.heads,
            head_score=self.head_score,
            hafl_score_steps=self.hafl_score_steps,
            hafl_mode=self.hafl_mode,
            method_options=self.option_values(),
        )

    def option_values(self) -> dict[str, Any]:
        """Every option of the method (:meth:`fedlora.methods.Method.option_values`): the
        ``method_options`` given, the older fields, the defaults; a :class:`ConfigError` names
        an option the method does not take, a bad value or a meaningless combination. An older
        field counts as given (for the combination checks) when it differs from its default."""
        method = get_method(self.method)
        own = {o.name for o in method.options}
        changed = {
            n: getattr(self, n)
            for n in OPTION_FIELDS
            if n in own and getattr(self, n) != _FIELD_DEFAULTS[n]
        }
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be a dict, got {self.method_options!r}")
        try:
            return method.option_values({**changed, **self.method_options}, base=self)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None

    def label(self) -> str:
        """The method's name with its non-default options (``hetlora (hetlora_prune=True)``)."""
        return get_method(self.method).label(self.option_values())

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
        from fedlora.simulate.tasks import task_names, task_spec

        if self.task not in task_names():
            raise ConfigError(f"--task must be one of {', '.join(task_names())}; got {self.task!r}")
        spec = task_spec(self.task)
        from fedlora.simulate.devices import DTYPES, check_device_name

        check_device_name(self.device)
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.method not in names():
            raise ConfigError(f"--method must be one of {', '.join(names())}; got {self.method!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        owners = option_owners()
        for name in OPTION_FIELDS:  # every run reads them (budgets: heads); checked by their spec
            try:
                owners[name][0].check(getattr(self, name))
            except (TypeError, ValueError) as err:
                raise ConfigError(str(err)) from None
        for name in ("clients", "rounds", "local_steps", "batch_size", "rank"):
            _check_int(name, getattr(self, name), 1, MAX_COUNT)
        _check_int("max_length", self.max_length, 2, MAX_COUNT)  # [CLS] and [SEP] at least
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
        if tm is None and spec.defaults.get("target_modules", ()) is None:
            tm = ["(model default)"]  # the model family's projections
        if isinstance(tm, str) or not isinstance(tm, (list, tuple)):
            raise ConfigError(f"--target-modules must be a list of module names, got {tm!r}")
        if not tm or not all(isinstance(t, str) and t.strip() for t in tm):
            raise ConfigError(f"--target-modules must name at least one module, got {tm!r}")
        dup = sorted({t for t in tm if list(tm).count(t) > 1})
        if dup:
            raise ConfigError(f"--target-modules names {', '.join(dup)} more than once")
        _check_path("model", self.model, want_dir=True, names=spec.model_names)
        self._check_data()
        _check_path("init_adapter", self.init_adapter, want_dir=True)
        values = self.option_values()
        for name, value in values.items():  # a rank-valued option cannot exceed --rank
            if name.endswith("truncations") and value and max(value) > self.rank:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {max(value)} exceeds the global rank --rank "
                    f"({self.rank})"
                )
        self._validate_knobs()
        parse_budgets(self)
        from fedlora.simulate import privacy_run  # --- differential privacy

        privacy_run.check(self)
        return self

    def _check_data(self) -> None:
        """``data`` (a file, or for sft also a built-in set, a ``reasoning_gym:`` spec or a
        dataset folder), ``system_prompt``, ``data_split`` and ``data_columns``."""
        from fedlora.data import BUILTIN_SETS, COLUMN_FIELDS, REASONING_GYM_PREFIX
        from fedlora.simulate.tasks import task_spec

        sft = task_spec(self.task).causal_lm  # the LLM data forms and options
        if sft and isinstance(self.data, str) and self.data.startswith(REASONING_GYM_PREFIX):
            from fedlora.data import reasoning_gym_tasks

            try:
                reasoning_gym_tasks(self.data)
            except (ValueError, ImportError) as err:
                raise ConfigError(f"--data: {err}") from None
        else:
            _check_path("data", self.data, want_dir=False, names=BUILTIN_SETS * sft, dirs_ok=sft)
        for name in ("system_prompt", "data_split"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ConfigError(f"{_opt(name)} must be a non-empty string, got {v!r}")
        cols = self.data_columns
        if cols is not None:
            if not isinstance(cols, dict) or not cols:
                raise ConfigError(
                    f"--data-columns must map fields to column names, e.g. "
                    f"instruction=question,output=answer; got {cols!r}"
                )
            for k, v in cols.items():
                if k not in COLUMN_FIELDS:
                    raise ConfigError(
                        f"--data-columns: unknown field {k!r}; the fields are "
                        f"{', '.join(COLUMN_FIELDS)}"
                    )
                if not isinstance(v, str) or not v.strip():
                    raise ConfigError(f"--data-columns: {k} must name a column, got {v!r}")
            dup = sorted({v for v in cols.values() if list(cols.values()).count(v) > 1})
            if dup:
                raise ConfigError(f"--data-columns maps column {dup[0]!r} to two fields")
        if not sft:
            given = [n for n in ("system_prompt", "data_split", "data_columns") if getattr(self, n)]
            if given:
                raise ConfigError(f"{_opt(given[0])} applies to --task sft only")

    def _validate_knobs(self) -> None:
        """The training knobs, logging and memory options (see the class docstring)."""
        from fedlora.local import LR_SCHEDULERS

        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(
                f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}; "
                f"got {self.lr_scheduler!r}"
            )
        _check_int("warmup_steps", self.warmup_steps, 0, MAX_COUNT)
        _check_float("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("--warmup-steps and --warmup-ratio: give one of them, not both")
        if self.max_grad_norm is not None:
            _check_float("max_grad_norm", self.max_grad_norm, 0.0, math.inf, low_open=True)
        _check_int("grad_accum", self.grad_accum, 1, MAX_COUNT)
        if isinstance(self.batch_size, int) and self.batch_size % self.grad_accum:
            raise ConfigError(
                f"--grad-accum {self.grad_accum} does not divide --batch-size {self.batch_size}: "
                "each micro-batch must hold the same number of examples"
            )
        _check_float("lora_dropout", self.lora_dropout, 0.0, 1.0)
        if self.lora_dropout >= 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout:g}")
        _check_int("max_tokens_per_pass", self.max_tokens_per_pass, 0)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(
                f"--gradient-checkpointing must be true or false, got {self.gradient_checkpointing!r}"
            )
        _check_int("eval_every", self.eval_every, 1, MAX_COUNT)
        if self.report_to not in REPORT_TO:
            raise ConfigError(
                f"--report-to must be one of {', '.join(REPORT_TO)}; got {self.report_to!r}"
            )
        from fedlora.quantize import QUANTIZE

        if self.quantize not in QUANTIZE:
            raise ConfigError(
                f"--quantize must be one of {', '.join(QUANTIZE)}; got {self.quantize!r}"
            )
        from fedlora.simulate.tasks import task_spec

        if self.quantize != "none" and not task_spec(self.task).causal_lm:
            raise ConfigError(
                f"--quantize {self.quantize}: only a causal-LM task (--task sft) has a "
                "quantized base"
            )
        if self.quantize != "none":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError(
                    f"--quantize {self.quantize}: the bitsandbytes package is not installed "
                    "(pip install 'fedlora-kernels[qlora]')"
                )
        if self.report_to == "tensorboard":
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError(
                    "--report-to tensorboard: the tensorboard package is not installed "
                    "(pip install 'fedlora-kernels[tensorboard]')"
                )

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
        for name in _HOW_FIELDS:  # e.g. another device: the last bits may differ
            data.pop(name, None)
        for name, default in _LATER_FIELDS.items():
            if data.get(name) == default:
                data.pop(name)
        if data.get("max_test") == 0:  # "the whole test split" was None before
            data["max_test"] = None
        return json.dumps(data, sort_keys=True)


_FIELD_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(SimConfig) if f.name in OPTION_FIELDS
}


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


def parse_columns(text: str) -> dict[str, str]:
    """``--data-columns``: ``"instruction=question,output=answer"`` as a dict (field: column);
    :class:`ConfigError` when an item is not ``field=column``."""
    out: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        field, sep, column = (s.strip() for s in item.partition("="))
        if not sep or not field or not column:
            raise ConfigError(
                f"--data-columns: cannot parse {item!r}; expected field=column items joined by "
                "commas, e.g. instruction=question,output=answer"
            )
        if field in out:
            raise ConfigError(f"--data-columns names {field} more than once")
        out[field] = column
    if not out:
        raise ConfigError(f"--data-columns: empty mapping {text!r}")
    return out


def _check_path(
    name: str, v: Any, *, want_dir: bool, names: tuple[str, ...] = (), dirs_ok: bool = False
) -> None:
    """``v`` is None, one of the built-in ``names``, or names an existing folder
    (``want_dir``) or file (or either, with ``dirs_ok``)."""
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
    if is_dir != want_dir and not dirs_ok:
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
