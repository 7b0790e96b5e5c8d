"""The federated training loop: rounds, clients, the two engines, checkpoints.

``sequential`` trains one client after another on a one-slot model (how FL frameworks
simulate). ``batched`` builds the model with one adapter slot per client of a round and trains
the whole round in one forward/backward per step: each client's batch is a segment, the loss is
the sum of per-client mean losses (so each client's gradient is exactly its own), optimizer state
is stacked per slot, and clients with fewer local steps are masked out of later steps. Both
engines run the same code on the same batches (every random choice is keyed by seed, round and
client), so they give the same numbers up to floating-point summation order.

What is learnt and how it is scored is the task's (:mod:`fedlora.simulate.tasks`): its data,
model, per-segment loss and evaluation. The loop never branches on the task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlora import local, rounds
from fedlora.methods import Client
from fedlora.methods import get as get_method
from fedlora.simulate import privacy_run  # --- differential privacy
from fedlora.simulate.config import Budget, ConfigError, SimConfig
from fedlora.simulate.outputs import (  # noqa: F401  (re-exported: compare, tests, examples)
    CKPT,
    CKPT_DIGEST_KEY,
    CKPT_FORMAT,
    CKPT_META_KEY,
    LEGACY_CKPT_JSON,
    OUTPUT_NAMES,
    REPORTS,
    _atomic_write,
    check_out_dir,
    check_plotting,
    clean_stale_temps,
    locks_out_dir,
    matplotlib_missing,
    plot_curves,
    probe_writable,
    read_checkpoint,
    run_record,
    write_checkpoint,
    write_outputs,
    write_reports,
)
from fedlora.simulate.progress import RunProgress, round_steps, tick
from fedlora.simulate.setup import RunSetup, partition, setup_run
from fedlora.simulate.tasks import Batch, Task, get_task, model_device
from fedlora.simulate.tasks.classify import (  # noqa: F401  (re-exported: the classify pieces)
    EVAL_BATCH,
    Tokenized,
    build_model,
    evaluate,
    load_dataset,
    tokenize_split,
)
from fedlora.state_dict import (
    adapter_layers,
    apply_base_merges,
    get_adapter_state_dict,
    set_adapter_state_dict,
)


# ------------------------------------------------------------------------------------- data
def client_batches(
    indices: list[int], batch_size: int, steps: int, seed: int, round_idx: int, client: int
) -> list[list[int]]:
    """``steps`` batches for one client in one round (:func:`fedlora.local.sample_batches`)."""
    return local.sample_batches(indices, batch_size, steps, seed, round_idx, client)


def sample_clients(cfg: SimConfig, round_idx: int) -> list[int]:
    """The clients of round ``round_idx`` (0-based), in increasing order: all of them, or
    ``clients_per_round`` drawn by :func:`fedlora.rounds.sample_clients` (seeded by seed and
    round, so a resumed run and both engines draw the same ones)."""
    return rounds.sample_clients(cfg.seed, round_idx, range(cfg.clients), cfg.clients_per_round)


#: kept for older callers: :func:`fedlora.local.route_segments`
set_segments = local.route_segments


# ------------------------------------------------------------------------------------- training
@dataclass
class ClientJob:
    """One client's work in a round: example indices per batch into the round's data."""

    client: int
    budget: Budget
    batches: list[list[int]]
    state: dict[str, torch.Tensor]
    seed: int


class _Taken:
    """A job's batches drawn from the encoded training split on demand."""

    def __init__(self, data: Batch, batches: list[list[int]]) -> None:
        self.data, self.batches = data, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        return self.data.take(self.batches[i])


class Uploads(list):
    """``(state, meta)`` uploads of a group, with each client's per-step training losses."""

    step_losses: list[list[float]]


def train_group(
    model: nn.Module,
    rule: Client,
    jobs: list[ClientJob],
    data: Batch,
    cfg: SimConfig,
    round_idx: int,
    task: Task | None = None,
) -> tuple[list[tuple[dict, dict]], list[float]]:
    """Train ``jobs`` together, client ``i`` in slot ``i`` (:func:`fedlora.local.train_slots`
    with the task's loss and the config's training knobs); return ``(state, meta)`` uploads
    (an :class:`Uploads`, which also holds each client's per-step losses) and each client's
    last loss."""
    task = task or get_task(cfg.task)
    results = local.train_slots(
        model,
        rule,
        [local.Job(j.client, j.budget, j.state, _Taken(data, j.batches), j.seed) for j in jobs],
        task,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        round_idx=round_idx,
        on_step=lambda done, total: tick(),
        **cfg.train_options(),
    )
    uploads = Uploads((r.state, r.meta) for r in results)
    uploads.step_losses = [list(r.step_losses) for r in results]
    return uploads, [r.metrics["train_loss"] for r in results]


@torch.no_grad()
def evaluate_global(
    model: nn.Module, task: Task, global_state: dict[str, torch.Tensor], test: Any, cfg: SimConfig
) -> dict[str, Any]:
    """The task's metrics of the global adapter (loaded into slot 0) on ``test``."""
    set_adapter_state_dict(model, global_state, slot=0)
    local.route_segments(model, None)
    return task.evaluate(model, test, cfg)


# ------------------------------------------------------------------------------------- run
@dataclass
class RunResult:
    """What :func:`run` returns: the config, the evaluation before training (``initial``, the
    global model of round 0), per-round metrics and the final global state."""

    config: SimConfig
    rounds: list[dict[str, Any]] = field(default_factory=list)
    global_state: dict[str, torch.Tensor] = field(default_factory=dict)
    initial: dict[str, Any] | None = None
    #: how the splits were encoded, per split (SFT: examples, truncated, dropped)
    data: dict[str, Any] = field(default_factory=dict)


# what a run builds before its first round (public: fedlora.simulate.setup_run)
_Setup = RunSetup
_partition = partition
_setup = setup_run


@locks_out_dir  # one run per --out at a time (an advisory lock, dropped when the process ends)
def run(
    cfg: SimConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    shared: dict | None = None,
    plot: bool | None = None,
) -> RunResult:
    """Run a whole federated experiment; write metrics, plot and checkpoint to ``out_dir``.

    Everything that can be checked is checked before the first round (the config, ``out_dir``
    by creating it and a probe file, the checkpoint when resuming, the data file, the device,
    the model, the partition): any problem is a one-line :class:`ConfigError` and nothing is
    written. ``shared`` may hold a ``"dataset"`` and a ``"model"`` (the task's
    ``(model, tokenizer)`` before injection, used once) to reuse. ``plot``: draw curves.png (None: when matplotlib imports;
    otherwise skip it with one warning). Stale temp files of a killed run are removed before the
    first write. The global model is evaluated once before round 1 (``RunResult.initial``,
    round 0 of the reports).
    """
    cfg.validate()
    if out_dir is not None and not str(out_dir).strip():
        raise ConfigError("--out must name a directory, got ''")
    if cfg.report_to != "none" and out_dir is None:
        raise ConfigError(f"--report-to {cfg.report_to} needs an output folder (--out)")
    out = Path(out_dir).expanduser() if out_dir is not None else None
    result = RunResult(cfg)
    ckpt = None
    if out is not None:
        ckpt = check_out_dir(out, cfg, resume)
        if resume and ckpt is None:
            log(
                f"{out} holds no checkpoint yet (stopped before round 1 ended?); starting at round 1"
            )
    s = _setup(cfg, shared, log)
    result.data = s.data
    model, device = s.model, model_device(s.model)
    global_state = get_adapter_state_dict(model, slot=0)
    record = run_record(cfg, model)
    if cfg.init_adapter is not None and ckpt is None:  # a PEFT LoRA as the initial global
        from fedlora.export import peft_adapter_state

        global_state = peft_adapter_state(cfg.init_adapter, model, cfg, global_state, record)
    start_round = 0
    if ckpt is not None:
        global_state, result.rounds, result.initial = ckpt
        _check_resumable(model, cfg, global_state)
        global_state = {k: v.to(device) for k, v in _restore_bases(model, global_state).items()}
        start_round = len(result.rounds)
        if start_round >= cfg.rounds:
            log(f"{out} already holds all {start_round} rounds; nothing to run")
        else:
            log(f"resuming {out} at round {start_round + 1}/{cfg.rounds}")
    plot = check_plotting(plot) if out is not None else False
    if out is not None:  # last check before training: --out is writable
        probe_writable(out)
        clean_stale_temps(out)
        if ckpt is not None and start_round >= cfg.rounds:  # a kill may have hit the reports
            write_reports(
                out, cfg, result.rounds, plot=plot, initial=result.initial, data=result.data
            )
    if start_round == 0 and result.initial is None:
        t0 = time.perf_counter()
        result.initial = evaluate_global(model, s.task, global_state, s.test, cfg)
        result.initial["seconds"] = time.perf_counter() - t0
        log(f"round   0/{cfg.rounds}  {s.task.round_line(result.initial)}  (before training)")

    # the server's bookkeeping (fedlora.rounds): budgets, downloads, per-round options and what
    # the client side keeps from the last round (HAFL truncation's scores; a resumed run replays
    # it on the last recorded row)
    server = rounds.Server(
        s.method,
        global_state,
        options=cfg.client_options(),
        budgets=dict(enumerate(s.budgets)),
        seed=cfg.seed,
        error=True,
        side=s.rule,
        dp=privacy_run.aggregator(cfg, s.budgets, s.weights, result.rounds),  # --- DP
    )
    server.restore(global_state, result.rounds[-1] if result.rounds else None)
    board = _board(cfg, out, result)
    try:
        _rounds(cfg, s, server, result, out, start_round, plot, progress, log, board, record)
    finally:
        if board is not None:
            board[0].close()
    return result


def _board(cfg: SimConfig, out: Path | None, result: RunResult) -> list | None:
    """``[TensorBoardLog, next global step]`` for ``--report-to tensorboard`` (None otherwise);
    round 0 (and the rounds of a resumed run) logged."""
    if cfg.report_to != "tensorboard" or out is None:
        return None
    from fedlora.simulate.steplog import TensorBoardLog

    board = TensorBoardLog(out)
    step = 0
    for row in ([{"round": 0, **result.initial}] if result.initial else []) + result.rounds:
        step = board.log_round(row, step)
    return [board, step]


def _rounds(
    cfg: SimConfig,
    s: _Setup,
    server: rounds.Server,
    result: RunResult,
    out: Path | None,
    start_round: int,
    plot: bool,
    progress: bool,
    log: Callable[[str], None],
    board: list | None,
    record: dict[str, Any],
) -> None:
    """Rounds ``start_round`` to the last: train, aggregate, evaluate, write the outputs
    (``record``: what the checkpoint header keeps for ``fedlora export``)."""
    from fedlora.simulate.steplog import write_steps

    model = s.model
    global_state = server.global_state
    bar = RunProgress(round_steps(cfg, s.rule, s.budgets), start_round, enabled=progress, log=log)
    for r in range(start_round, cfg.rounds):
        bar.round_start(r)
        global_state, row = _federated_round(r, cfg, s, server)
        result.rounds.append(row)
        line = s.task.round_line(row) if evaluated(cfg, r) else "(not evaluated: --eval-every)"
        bar.write(
            f"round {r + 1:3d}/{cfg.rounds}  {line}  "
            f"agg-err {row['aggregation_error']:.2e}  up {row['bytes_up'] / 2**20:.2f} MiB  "
            f"down {row['bytes_down'] / 2**20:.2f} MiB  {row['seconds']:.1f}s"
            + privacy_run.progress(row)  # --- differential privacy
        )
        if out is not None:
            write_outputs(
                out,
                cfg,
                result.rounds,
                global_state | _changed_bases(model, cfg),
                plot=plot,
                initial=result.initial,
                data=result.data,
                resolved=record,
            )
            write_steps(out, result.rounds)
        if board is not None:
            board[1] = board[0].log_round(row, board[1])
    bar.close()
    result.global_state = global_state


def _federated_round(
    r: int, cfg: SimConfig, s: _Setup, server: rounds.Server
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Round ``r``: the round's clients (all, or ``clients_per_round`` sampled) download from
    ``server``, train (one group or one per client, by engine) and upload; the server
    aggregates; the new global is evaluated. Returns it and the round's row."""
    from fedlora.methods.prefix import nbytes

    t0 = time.perf_counter()
    rule, model = s.rule, s.model
    sampled = sample_clients(cfg, r)
    downloads = server.configure(r, sampled)
    jobs = []
    for k, d in downloads.items():
        steps = rule.pre_steps(d.budget) + d.budget.steps
        batches = client_batches(s.parts[k], cfg.batch_size, steps, cfg.seed, r, k)
        jobs.append(ClientJob(k, d.budget, batches, d.state, d.seed))
    groups = [jobs] if cfg.engine == "batched" else [[j] for j in jobs]
    uploads, losses, steps = [], [], []
    for group in groups:
        ups, ls = train_group(model, rule, group, s.train, cfg, r, s.task)
        uploads += ups
        losses += ls
        steps += getattr(ups, "step_losses", None) or [[x] for x in ls]
    uploads = privacy_run.clip_uploads(cfg, [j.state for j in jobs], uploads)  # --- DP
    replies = [
        rounds.Reply(j.client, state, s.weights[j.client], meta)
        for j, (state, meta) in zip(jobs, uploads, strict=True)
    ]
    outcome = server.aggregate(r, replies)
    if outcome.state is None and not outcome.metrics:  # the rule itself failed: a bug, not input
        raise RuntimeError(outcome.error)
    agg = outcome.metrics
    if outcome.state is not None:
        # FLoRA / FedEx-LoRA: fold the server's merge instructions into the shared frozen base
        server.global_state = apply_base_merges(model, outcome.state)
    global_state = server.global_state
    if evaluated(cfg, r):
        metrics = evaluate_global(model, s.task, global_state, s.test, cfg)
    else:  # --eval-every: a round between evaluations
        metrics = {c: float("nan") for c in s.task.columns}
    used = agg.get("clients_used", len(replies))
    states = [u[0] for u in uploads]
    row = {
        "round": r + 1,
        **metrics,
        "train_loss": float(sum(losses) / len(losses)),
        "aggregation_error": float(agg.get("aggregation_error", float("nan"))),
        "bytes_up": int(sum(nbytes(st) for st in states)),
        "bytes_down": int(sum(nbytes(j.state) for j in jobs)),
        "clients_used": int(len(used) if isinstance(used, list) else used),
        "rejected": agg.get("rejected", []),
        "seconds": time.perf_counter() - t0,
        # each client's training loss per local step (steps.csv, TensorBoard)
        "step_losses": {
            str(j.client): [float(x) for x in h] for j, h in zip(jobs, steps, strict=True)
        },
    }
    if cfg.clients_per_round is not None:
        row["sampled"] = sampled
    for key in s.method.logged:  # per-round diagnostics the method asks to keep (segment norms)
        if key in agg:
            row[key] = agg[key]
    row.update(privacy_run.row_fields(agg))  # --- differential privacy: ε so far
    if isinstance(agg.get("scores"), dict):  # HAFL's averaged component scores (resume needs them)
        row["scores"] = {p: [float(x) for x in v.tolist()] for p, v in agg["scores"].items()}
    return global_state, row


def evaluated(cfg: SimConfig, r: int) -> bool:
    """Whether round ``r`` (0-based) evaluates the global model: every ``--eval-every``-th round
    and the last one."""
    return (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds


BASE_SUFFIX = ".base_layer.weight"


def _changed_bases(model: nn.Module, cfg: SimConfig) -> dict[str, torch.Tensor]:
    """Frozen base weights that the run has changed (FLoRA, FedEx-LoRA), for the checkpoint."""
    if not get_method(cfg.method).changes_base:
        return {}
    from fedlora.quantize import dense_weight, is_quantized

    return {
        f"{p}{BASE_SUFFIX}": dense_weight(m.base_layer).to(m.base_layer.weight.device)
        if is_quantized(m.base_layer)
        else m.base_layer.weight.detach().clone()
        for p, m in adapter_layers(model)
    }


def _restore_bases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy checkpointed base weights into the model; return the adapter state without them."""
    layers = dict(adapter_layers(model))
    rest = {}
    for key, value in state.items():
        if key.endswith(BASE_SUFFIX):
            base = layers[key[: -len(BASE_SUFFIX)]].base_layer
            from fedlora.quantize import is_quantized, set_dense_weight

            if is_quantized(base):
                set_dense_weight(base, value)
                continue
            with torch.no_grad():
                base.weight.copy_(value)
        else:
            rest[key] = value
    return rest


def _check_resumable(model: nn.Module, cfg: SimConfig, state: dict[str, torch.Tensor]) -> None:
    """The checkpointed tensors have exactly the names and shapes this model's state has."""
    want = {k: tuple(v.shape) for k, v in get_adapter_state_dict(model, slot=0).items()}
    want |= {k: tuple(v.shape) for k, v in _changed_bases(model, cfg).items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if have != want:
        diff = sorted(set(have) ^ set(want)) or sorted(k for k in have if have[k] != want[k])
        raise ConfigError(
            f"--resume: the checkpoint does not match the model ({len(diff)} tensor(s) differ, "
            f"e.g. {diff[0]!r}); was the model folder changed?"
        )
