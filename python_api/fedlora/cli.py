"""The ``fedlora`` command: ``fedlora simulate`` and ``fedlora compare``.

Errors in the configuration print one line on stderr and exit with code 2 before anything is
written or trained: an unknown option or a value argparse cannot convert, a number out of its
range (counts must be positive integers, ``--lr`` finite in (0, 1], ...; see
:meth:`SimConfig.validate`), a budget spec that does not parse, a ``--model`` that is not a
loadable model folder, a ``--data`` file that cannot be read, an ``--out`` that is a file, under
a file, not writable or holding another run, and a corrupted checkpoint on ``--resume``. The
checks live in :class:`SimConfig` and :func:`fedlora.simulate.run`, so the Python API raises the
same :class:`ConfigError`. An interrupted run exits with code 130 and can be resumed.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from fedlora.methods import names as method_names
from fedlora.simulate.config import (
    ENGINES,
    HAFL_MODES,
    HEAD_SCORES,
    TASK_DEFAULTS,
    TASKS,
    ConfigError,
    SimConfig,
)
from fedlora.simulate.devices import DTYPES

_DEFAULTS = SimConfig()


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    p.add_argument(
        "--task",
        default=d.task,
        choices=list(TASKS),
        help="classify (an encoder, a label head: the default) or sft (instruction tuning of "
        "a causal LM)",
    )
    p.add_argument(
        "--clients", type=int, default=d.clients, help="number of clients (default %(default)s)"
    )
    p.add_argument(
        "--rounds", type=int, default=d.rounds, help="federated rounds (default %(default)s)"
    )
    p.add_argument("--local-steps", type=int, default=d.local_steps, help="local steps per round")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per local step")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"AdamW learning rate (default {_task_defaults('lr')})",
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
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
    p.add_argument("--heads", type=int, default=d.heads, help="Ravan heads per layer")
    p.add_argument(
        "--head-score",
        default=d.head_score,
        choices=list(HEAD_SCORES),
        help="Ravan head selection",
    )
    p.add_argument(
        "--hafl-score-steps",
        type=int,
        default=d.hafl_score_steps,
        help="HAFL batches that only score importance",
    )
    p.add_argument(
        "--hafl-mode",
        default=d.hafl_mode,
        choices=list(HAFL_MODES),
        help="HAFL: freeze (hold rank R, train the top budget components) or truncate (hold "
        "the top budget rank components by the server's scores)",
    )
    p.add_argument(
        "--engine",
        default=d.engine,
        help=f"{' | '.join(ENGINES)} (batched: all clients of a round in one pass)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
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
        "arithmetic (default), stdlib_qa, or a JSONL/CSV file of instruction/input/output or "
        "chat messages",
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
        "--target-modules",
        default=None,
        help="comma-separated module names to adapt (default: query,value for classify, the "
        "model family's q_proj,v_proj for sft)",
    )
    p.add_argument(
        "--clients-per-round",
        type=int,
        default=None,
        help="clients sampled each round (seeded; default: all)",
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from fedlora.simulate import privacy_run  # --- differential privacy

    privacy_run.add_options(p)


def _config(args: argparse.Namespace, method: str) -> SimConfig:
    fields = {f.name for f in dataclasses.fields(SimConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["method"] = method
    if args.target_modules is not None:
        values["target_modules"] = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    return SimConfig(**values).validate()


def _task_defaults(name: str) -> str:
    """``"classify X, sft Y"``: a task-dependent default for the help text."""
    return ", ".join(f"{task} {TASK_DEFAULTS[task][name]}" for task in TASKS)


def _simulate(args: argparse.Namespace) -> int:
    from fedlora.simulate.engine import run

    cfg = _config(args, args.method)
    result = run(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    last = result.rounds[-1] if result.rounds else result.initial or {}
    metric, label = (
        ("test_accuracy", "test accuracy") if cfg.task == "classify" else ("rouge_l", "ROUGE-L")
    )
    print(
        f"done: {cfg.method} final {label} {last.get(metric, float('nan')):.3f}"
        f"; outputs in {args.out}"
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedlora.simulate.compare import CompareSpec, compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in method_names()]
    if bad or not methods:
        raise ConfigError(
            f"--methods must list methods from {', '.join(method_names())}; got {args.methods!r}"
        )
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise ConfigError(f"--methods names {', '.join(dup)} more than once")
    configs = [_config(args, m) for m in methods]
    spec = CompareSpec(
        seeds=_seeds(args.seeds, args.seed),
        lr_grid=None if args.lr_grid is None else _floats("--lr-grid", args.lr_grid),
        baseline=args.baseline,
        match=args.match,
        target=args.target,
        val_fraction=args.val_fraction,
    )
    command = "fedlora " + " ".join(shlex.quote(a) for a in (args.argv or []))
    compare(configs, Path(args.out), spec=spec, progress=not args.no_progress, command=command)
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
    parser = _Parser(prog="fedlora", description="Federated LoRA-family fine-tuning, offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run one federated experiment")
    sim.add_argument(
        "--method", default=_DEFAULTS.method, help=f"one of {', '.join(method_names())}"
    )
    sim.add_argument("--out", default="runs/simulate", help="output directory")
    sim.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    _add_run_options(sim)
    sim.set_defaults(func=_simulate)
    cmp = sub.add_parser(
        "compare", help="run several methods on the same partition; one table and plot"
    )
    cmp.add_argument("--methods", required=True, help="comma-separated methods")
    cmp.add_argument("--out", default="runs/compare", help="output directory")
    cmp.add_argument(
        "--seeds", default=None, help="a count N (seeds --seed .. --seed+N-1) or a list '0,1,2'"
    )
    cmp.add_argument(
        "--lr-grid", default=None, help="learning rates tried per method on a validation split"
    )
    cmp.add_argument("--val-fraction", type=float, default=0.1, help="validation share of train")
    cmp.add_argument("--baseline", default=None, help="method to pair every other against")
    cmp.add_argument(
        "--match", default="none", help="budget matching axis: none | comm (numbers sent)"
    )
    cmp.add_argument("--target", type=float, default=None, help="accuracy for rounds-to-target")
    _add_run_options(cmp)
    cmp.set_defaults(func=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedlora`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a one-line argparse error (2)
        return stop.code if isinstance(stop.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for "reproduce with" lines
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"fedlora: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted; continue the run with --resume", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text else text


if __name__ == "__main__":
    sys.exit(main())
