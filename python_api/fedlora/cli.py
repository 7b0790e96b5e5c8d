"""The ``fedlora`` command: ``fedlora simulate``, ``fedlora compare`` and ``fedlora export``.

Every option's default is shown in ``--help``; ``fedlora --version`` prints the version. While
a run starts, one line on stdout says what it loads, and the one-time cache builds say how long
they take (the ``fedlora`` logger's INFO lines are shown on stdout while a command runs; stderr
keeps the progress bar, warnings and the one-line errors).

Errors in the configuration print one line on stderr and exit with code 2 before anything is
written or trained: an unknown option or a value argparse cannot convert, a number out of its
range (counts must be positive integers, ``--lr`` finite in (0, 1], ...; see
:meth:`SimConfig.validate`), a budget spec that does not parse, a ``--model`` that is not a
loadable model folder, a ``--data`` file that cannot be read, an ``--out`` that is a file, under
a file, not writable or holding another run, and a corrupted checkpoint on ``--resume``. The
checks live in :class:`SimConfig` and :func:`fedlora.simulate.run`, so the Python API raises the
same :class:`ConfigError`. An interrupted run exits with code 130 and can be resumed.

``--config run.toml`` reads the options from a TOML file (keys spelled as the long options,
:mod:`fedlora.simulate.config_file`); options on the command line override it. ``--print-config``
prints a complete file (every option with its value: the default, or what ``--config`` and the
command line set) and exits. A file that is not TOML, an unknown key and a value of the wrong
type are one-line errors naming the key (exit code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from fedlora.methods import get as get_method
from fedlora.methods import names as method_names
from fedlora.methods import option_owners
from fedlora.simulate.config import (
    ENGINES,
    OPTION_FIELDS,
    ConfigError,
    SimConfig,
    parse_columns,
)
from fedlora.simulate.devices import DTYPES
from fedlora.simulate.tasks import task_names, task_spec

_DEFAULTS = SimConfig()


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help: ``(default: X)`` appended unless the help already
    says its default (task-dependent ones do, in words); flags default to off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if not action.option_strings or action.required or action.default is argparse.SUPPRESS:
            return help_text
        if "default" in help_text:
            return help_text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{help_text} (default: off)".strip()
        if action.default is None:  # said in words, never printed as "None"
            return f"{help_text} (default: not set)".strip()
        return f"{help_text} (default: %(default)s)".strip()


def _add_run_options(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    p.add_argument(
        "--task",
        default=d.task,
        choices=list(task_names()),
        help="; ".join(f"{t}: {task_spec(t).summary}" for t in task_names()),
    )
    p.add_argument(
        "--clients", type=int, default=d.clients, help="number of clients (default %(default)s)"
    )
    p.add_argument(
        "--rounds", type=int, default=d.rounds, help="federated rounds (default %(default)s)"
    )
    p.add_argument(
        "--local-steps", type=int, default=d.local_steps, help="local optimizer steps per round"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per local step")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"AdamW learning rate (default {_task_defaults('lr')})",
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument(
        "--dirichlet-alpha",
        type=float,
        default=d.dirichlet_alpha,
        help="non-IID label skew (smaller = more skew)",
    )
    p.add_argument(
        "--budgets",
        default=d.budgets,
        help="uniform | hetero | 'rank=2,4,8;heads=1,2;components=2,4;steps=5,3'",
    )
    p.add_argument(
        "--rank", type=int, default=d.rank, help="global LoRA rank R (Ravan: rank per head)"
    )
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (scale = alpha / R)")
    p.add_argument(
        "--engine",
        default=d.engine,
        help=f"{' | '.join(ENGINES)} (batched: all clients of a round in one pass)",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help="seeds the partition, sampling and init"
    )
    p.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model folder (default: the embedded all-MiniLM-L6-v2 for "
        "classify, the embedded SmolLM2-135M-Instruct, 'smollm2', for sft)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="classify: CSV/JSONL file with text,label columns (default: stdlib topics); sft: "
        "arithmetic (default), stdlib_qa, reasoning_gym:<task>[,<task>...], a JSONL/CSV file "
        "(instruction/output, prompt/completion, chat messages or ShareGPT conversations) or "
        "a local Hugging Face dataset (parquet/arrow/json file or save_to_disk folder)",
    )
    p.add_argument(
        "--data-split",
        default=None,
        help="sft, Hugging Face datasets: the split to read (default: train and test when it "
        "has both, else its one split)",
    )
    p.add_argument(
        "--data-columns",
        default=None,
        help="sft: the data's column for each field, e.g. "
        "instruction=question,output=answer,category=topic",
    )
    p.add_argument(
        "--system-prompt",
        default=None,
        help="sft: a system message put first in every conversation (training and evaluation)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help=f"tokens per example (default {_task_defaults('max_length')}; sft: longer "
        "responses are cut, prompts that fill it are left out, both counted)",
    )
    p.add_argument(
        "--max-test",
        type=int,
        default=None,
        help=f"test examples evaluated per round (0 = all; default {_task_defaults('max_test')})",
    )
    p.add_argument(
        "--max-train-per-client",
        type=int,
        default=None,
        help="cap on each client's training examples (default: none)",
    )
    p.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated module names to adapt (default: query,value for classify, the "
        "model family's q_proj,v_proj for sft)",
    )
    p.add_argument(
        "--clients-per-round",
        type=int,
        default=None,
        help="clients sampled each round, seeded (default: all)",
    )
    p.add_argument(
        "--device",
        default=d.device,
        help="auto (cuda when present), cpu, cuda or cuda:N",
    )
    p.add_argument(
        "--dtype",
        default=d.dtype,
        choices=list(DTYPES),
        help="the frozen base's dtype (auto: bfloat16 on a GPU, float32 on a CPU); adapters and "
        "optimizer state are always float32",
    )
    p.add_argument(
        "--max-generate",
        type=int,
        default=d.max_generate,
        help="sft: test prompts answered greedily each round, scored by ROUGE-L and exact match "
        "(0 = none)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help="sft: length limit of a generated answer",
    )
    _add_training_options(p, d)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_method_options(p)
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.toml",
        help="read options from a TOML file (keys as the long options, e.g. local-steps = 4); "
        "the command line overrides it",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print a complete configuration file (every option with its value) and exit",
    )
    from fedlora.simulate import privacy_run  # --- differential privacy

    privacy_run.add_options(p)


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """One flag per method option of the registry (:attr:`fedlora.methods.Method.options`):
    spelling, type, choices, default and help come from the method that owns it."""
    group = p.add_argument_group("method options (each taken only by the methods named)")
    for name, (opt, owners) in option_owners().items():
        kw: dict = {"default": None, "dest": f"opt_{name}"}
        if opt.kind == "str":
            kw["choices"] = list(opt.choices or ())
        elif opt.kind == "int":
            kw.update(type=int, metavar="N")
        elif opt.kind == "float":
            kw.update(type=float, metavar="X")
        elif opt.kind == "ints":
            kw["metavar"] = "N,N,..."
        elif opt.kind == "bool":  # --flag alone means true; --flag false turns it off
            kw.update(nargs="?", const="true", metavar="true|false")
        default = ",".join(map(str, opt.default)) if opt.kind == "ints" else opt.default
        named = opt.help.lower().startswith(tuple(owners))
        what = "" if named else f"{', '.join(owners)}: "
        kw["help"] = f"{what}{opt.help} (default {default if default != '' else 'none'})"
        kw["help"] = kw["help"].replace("%", "%%")
        group.add_argument(opt.flag, **kw)


def _given_options(args: argparse.Namespace) -> dict:
    """The method options set on the command line, parsed and checked by their spec."""
    given = {}
    for name, (opt, _) in option_owners().items():
        value = getattr(args, f"opt_{name}", None)
        if value is None:
            continue
        try:
            if isinstance(value, str) and opt.kind in ("bool", "ints"):
                value = opt.parse(value)
            given[name] = opt.check(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
    return given


def _method_options(given: dict, methods: list[str]) -> dict[str, dict]:
    """``{method: its options among given}``. An option no named method takes is refused
    (with one method: an option it does not take)."""
    owners = option_owners()
    for name in given:
        takers = [m for m in methods if m in owners[name][1]]
        if not takers:
            who = ", ".join(owners[name][1])
            one = f"method {methods[0]}" if len(methods) == 1 else "none of " + ", ".join(methods)
            raise ConfigError(
                f"{owners[name][0].flag}: {one} takes no such option (taken by {who})"
            )
    own = {m: {o.name for o in get_method(m).options} for m in methods}
    return {m: {k: v for k, v in given.items() if k in own[m]} for m in methods}


def _add_training_options(p: argparse.ArgumentParser, d: SimConfig) -> None:
    """The local loop's knobs, its memory bounds, evaluation interval and logging."""
    from fedlora.local import LR_SCHEDULERS
    from fedlora.simulate.config import REPORT_TO

    g = p.add_argument_group("training knobs")
    g.add_argument(
        "--lr-scheduler",
        default=d.lr_scheduler,
        help=f"learning-rate schedule over each client's local steps of a round "
        f"(transformers' get_scheduler): {', '.join(LR_SCHEDULERS)} (default: %(default)s)",
    )
    g.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="warmup steps (default: 0)"
    )
    g.add_argument(
        "--warmup-ratio",
        type=float,
        default=d.warmup_ratio,
        help="warmup as a share of the local steps (default: 0; give this or --warmup-steps)",
    )
    g.add_argument(
        "--max-grad-norm",
        type=float,
        default=d.max_grad_norm,
        help="clip each client's gradient to this norm (default: no clipping)",
    )
    g.add_argument(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help="micro-batches per batch whose gradients add up before one step; must divide "
        "--batch-size (default: 1)",
    )
    g.add_argument(
        "--lora-dropout",
        type=float,
        default=d.lora_dropout,
        help="dropout on the adapter input while training, seeded (default: 0)",
    )
    g.add_argument(
        "--max-tokens-per-pass",
        type=int,
        default=d.max_tokens_per_pass,
        help="batched engine: most tokens (sequences x width) in one forward/backward; a "
        "round's clients run in passes under it (default 0 = automatic: one client per pass on "
        "CPU, from the free memory on CUDA)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the frozen model's block activations in the backward pass (less "
        "memory, more time)",
    )
    g.add_argument(
        "--quantize",
        default=d.quantize,
        help="sft: the frozen base's linear layers in none, 4bit (NF4) or 8bit (LLM.int8()) "
        "through bitsandbytes, QLoRA (default: %(default)s)",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="evaluate the global model every N rounds and after the last (default: 1)",
    )
    g.add_argument(
        "--report-to",
        default=d.report_to,
        help=f"also log to: {', '.join(REPORT_TO)} (tensorboard: OUT/tensorboard; default: "
        "%(default)s)",
    )


def _config(args: argparse.Namespace, method: str, options: dict | None = None) -> SimConfig:
    fields = {f.name for f in dataclasses.fields(SimConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["method"] = method
    if args.target_modules is not None:
        values["target_modules"] = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if options is None:
        options = _method_options(_given_options(args), [method])[method]
    values["method_options"] = {k: v for k, v in options.items() if k not in OPTION_FIELDS}
    values.update({k: v for k, v in options.items() if k in OPTION_FIELDS})
    if args.data_columns is not None:
        values["data_columns"] = parse_columns(args.data_columns)
    return SimConfig(**values).validate()


def _task_defaults(name: str) -> str:
    """``"classify X, sft Y"``: a task-dependent default for the help text."""
    return ", ".join(f"{t} {task_spec(t).defaults[name]}" for t in task_names())


class _StreamHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` (or ``sys.stderr``) is when a record is
    emitted, so redirections made after it was created are honoured."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property  # type: ignore[override]
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def _progress_logs() -> Iterator[None]:
    """While a command runs: the ``fedlora`` logger's INFO lines (what is loaded, the one-time
    model and data cache builds) on stdout, its warnings on stderr as before (stderr keeps the
    progress bar, warnings and the one-line errors). The logger is left as it was afterwards."""
    root = logging.getLogger("fedlora")
    info = _StreamHandler("stdout")
    info.setFormatter(logging.Formatter("fedlora: %(message)s"))
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    warn = _StreamHandler("stderr")
    warn.setLevel(logging.WARNING)
    level = root.level
    root.addHandler(info)
    root.addHandler(warn)
    if level == logging.NOTSET or level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(info)
        root.removeHandler(warn)
        root.setLevel(level)


def _start_line(cfg: SimConfig, out: str) -> str:
    """What a run loads, said before it loads it."""
    spec = task_spec(cfg.task)
    model = cfg.model or spec.embedded_model
    data = cfg.data or spec.embedded_data
    return (
        f"fedlora: {cfg.method} on --task {cfg.task}: loading model {model} and data {data}; "
        f"{cfg.clients} clients, {cfg.rounds} rounds, outputs in {out}"
    )


def _simulate(args: argparse.Namespace) -> int:
    from fedlora.simulate.engine import run

    if not isinstance(args.method, str) or args.method not in method_names():
        raise ConfigError(
            f"--method must be one of {', '.join(method_names())}; got {args.method!r}"
        )
    cfg = _config(args, args.method)
    print(_start_line(cfg, args.out), flush=True)
    result = run(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    last = result.rounds[-1] if result.rounds else result.initial or {}
    spec = task_spec(cfg.task)
    metric, label = spec.metric, spec.metric_label
    print(
        f"done: {cfg.method} final {label} {last.get(metric, float('nan')):.3f}"
        f"; outputs in {args.out}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedlora.export import export_run

    export_run(args.run_dir, args.out, args.format)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedlora.simulate.compare import CompareSpec, compare

    if args.methods is None:
        raise ConfigError("--methods is required (on the command line or in --config)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in method_names()]
    if bad or not methods:
        raise ConfigError(
            f"--methods must list methods from {', '.join(method_names())}; got {args.methods!r}"
        )
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise ConfigError(f"--methods names {', '.join(dup)} more than once")
    per_method = _method_options(_given_options(args), methods)
    configs = [_config(args, m, per_method[m]) for m in methods]
    spec = CompareSpec(
        seeds=_seeds(args.seeds, args.seed),
        lr_grid=None if args.lr_grid is None else _floats("--lr-grid", args.lr_grid),
        baseline=args.baseline,
        match=args.match,
        target=args.target,
        val_fraction=args.val_fraction,
    )
    command = "fedlora " + " ".join(shlex.quote(a) for a in (args.argv or []))
    compare(
        configs,
        Path(args.out),
        spec=spec,
        progress=not args.no_progress,
        command=command,
        dry_run=args.dry_run,
        config_text=_resolved_text(args),
    )
    return 0


def _seeds(text: str | None, seed: int) -> tuple[int, ...]:
    """``--seeds``: a count ``N`` (seeds ``seed .. seed+N-1``) or a comma list of seeds."""
    if text is None:
        return (seed,)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(
            f"--seeds must be a count or a comma list of ints, got {text!r}"
        ) from None
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise ConfigError(f"--seeds must be a count >= 1 or a list of seeds, got {text!r}")
        return tuple(range(seed, seed + values[0]))
    return tuple(values)


def _floats(name: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a comma list of numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from fedlora import __version__
    from fedlora.export import FORMATS

    parser = _Parser(
        prog="fedlora",
        description="Federated LoRA-family fine-tuning, offline.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate", help="run one federated experiment", formatter_class=_HelpFormatter
    )
    sim.add_argument(
        "--method", default=_DEFAULTS.method, help=f"one of {', '.join(method_names())}"
    )
    sim.add_argument("--out", default="runs/simulate", help="output directory")
    sim.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    sim.add_argument(
        "--init-adapter",
        default=None,
        metavar="PEFT_DIR",
        help="start from this PEFT LoRA adapter folder (rank <= --rank, same base model and "
        "target modules; scale converted; default: the method's own initialisation)",
    )
    _add_run_options(sim)
    sim.set_defaults(func=_simulate)
    exp = sub.add_parser(
        "export",
        help="a run's global model as a PEFT LoRA folder or a merged transformers model",
        formatter_class=_HelpFormatter,
    )
    exp.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="the --out folder of a finished or resumable `fedlora simulate --task sft` run",
    )
    exp.add_argument("--out", required=True, help="a new or empty folder to write (required)")
    exp.add_argument(
        "--format",
        default="peft",
        choices=list(FORMATS),
        help="peft: adapter_config.json + adapter_model.safetensors (PEFT, vLLM); merged: a "
        "transformers model folder with the adapter folded in",
    )
    exp.set_defaults(func=_export)
    cmp = sub.add_parser(
        "compare",
        help="run several methods on the same partition; one table and plot",
        formatter_class=_HelpFormatter,
    )
    cmp.add_argument("--methods", default=None, help="comma-separated methods (required)")
    cmp.add_argument("--out", default="runs/compare", help="output directory")
    cmp.add_argument(
        "--seeds",
        default=None,
        help="a count N (seeds --seed .. --seed+N-1) or a list '0,1,2' (default: --seed only)",
    )
    cmp.add_argument(
        "--lr-grid",
        default=None,
        help="learning rates tried per method on a validation split (default: none, --lr)",
    )
    cmp.add_argument("--val-fraction", type=float, default=0.1, help="validation share of train")
    cmp.add_argument(
        "--baseline",
        default=None,
        help="method to pair every other against (default: none, no paired differences)",
    )
    cmp.add_argument(
        "--match",
        default="none",
        help="budget matching axis: none | comm (numbers sent) | compute (fwd/bwd passes)",
    )
    cmp.add_argument(
        "--target",
        type=float,
        default=None,
        help="accuracy for rounds-to-target (default: none, not reported)",
    )
    cmp.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, print the plan (budgets, rates, compute), train nothing",
    )
    _add_run_options(cmp)
    cmp.set_defaults(func=_compare)
    return parser


# ------------------------------------------------------------------ --config and --print-config
def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse offers no public lookup of a subcommand's parser
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The options of ``argv`` over those of its ``--config`` file over the defaults."""
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if path is not None:
        from fedlora.simulate.config_file import file_defaults, read_toml

        sub = _subparser(parser, args.command)
        sub.set_defaults(**file_defaults(read_toml(path), sub, where=f"--config {path}"))
        args = parser.parse_args(argv)  # the command line again, over the file's values
    return args


def _resolved_text(args: argparse.Namespace) -> str:
    """The command's resolved options as a TOML configuration file."""
    from fedlora.simulate.config_file import print_config_text

    source = f" (from {args.config} and the command line)" if args.config else ""
    header = (
        f"fedlora {args.command} configuration{source}: every option, spelled as its long "
        f"option; options left unset are commented out.\nUse it with: fedlora {args.command} "
        "--config FILE.toml"
    )
    return print_config_text(_subparser(build_parser(), args.command), vars(args), header)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedlora`` console script.

    Called without ``argv`` (the console script, ``python -m fedlora.cli``) it ends the process
    itself once a command has run: see :func:`_exit_now`. With ``argv`` (tests, other Python
    code) it returns the exit code."""
    code = _run(argv)
    if argv is None:
        _exit_now(code)
    return code


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(parser, argv)
    except SystemExit as stop:  # --help (0) or a one-line argparse error (2)
        return stop.code if isinstance(stop.code, int) else 2
    except ConfigError as err:
        print(f"fedlora: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    args.argv = argv  # for "reproduce with" lines
    if getattr(args, "print_config", False):
        print(_resolved_text(args), end="")
        return 0
    try:
        with _progress_logs():
            return args.func(args)
    except ConfigError as err:
        print(f"fedlora: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted; continue the run with --resume", file=sys.stderr)
        return 130


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's finalization.

    What kept ``fedlora simulate`` alive after ``done``: CPython's shutdown runs a full garbage
    collection over every object torch, transformers and the model left (about half a million
    for a tiny model) and then tears every module down, object by object, only for the OS to
    reclaim the memory anyway. Measured on this project's 2-core machine under load (load
    average 11): 4.3 s between ``done`` and the exit of a tiny-model run, 0.1 s with this exit;
    it grows with the heap and the load (1.5-2 min reported for the README SFT command). No
    thread or child process was left (only tqdm's daemon monitor). The ``atexit`` handlers
    (logging's flush, temp-file finalizers, ...) still run; then the standard streams are
    flushed and the process exits with ``code``."""
    import atexit
    import os

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _one_line(text: str) -> str:
    """``text`` on one line: a message of several lines joined with spaces; any other control
    character (a carriage return in an argument, say) written as its escape."""
    if "\n" in text:
        text = " ".join(text.split())
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


if __name__ == "__main__":
    sys.exit(main())
