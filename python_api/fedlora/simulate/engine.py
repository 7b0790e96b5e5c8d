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
from fedlora.simulate.config import Budget, ConfigError, SimConfig, parse_budgets
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
    write_checkpoint,
    write_outputs,
    write_reports,
)
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
    with the task's loss); return ``(state, meta)`` uploads and each client's last loss."""
    task = task or get_task(cfg.task)
    results = local.train_slots(
        model,
        rule,
        [local.Job(j.client, j.budget, j.state, _Taken(data, j.batches), j.seed) for j in jobs],
        task,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        round_idx=round_idx,
    )
    return [(r.state, r.meta) for r in results], [r.metrics["train_loss"] for r in results]


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


@dataclass
class _Setup:
    """Everything a run builds before its first round."""

    task: Task
    method: Any
    rule: Client
    budgets: list[Budget]
    model: nn.Module
    train: Batch
    test: Any
    parts: list[list[int]]
    weights: list[float]
    data: dict[str, Any] = field(default_factory=dict)


def _partition(cfg: SimConfig, train: Batch) -> tuple[list[list[int]], list[float]]:
    """Clients' example indices (non-IID over the examples' categories) and weights."""
    from fedlora.data import dirichlet_partition

    labels = train.categories.tolist()
    try:
        parts = dirichlet_partition(labels, cfg.clients, cfg.dirichlet_alpha, seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(f"--clients {cfg.clients}: {err}") from None
    if cfg.max_train_per_client:
        parts = [p[: cfg.max_train_per_client] for p in parts]
    return parts, [float(len(p)) for p in parts]


def _setup(cfg: SimConfig, shared: dict | None, log: Callable[[str], None]) -> _Setup:
    """The data, the model with its slots, the encoded splits and the partition."""
    task = get_task(cfg.task)
    budgets = parse_budgets(cfg)
    torch.manual_seed(cfg.seed)
    dataset = shared["dataset"] if shared and "dataset" in shared else task.load_data(cfg)
    method = get_method(cfg.method)
    rule = method.client(cfg.client_options(), budgets)
    per_round = cfg.clients_per_round or cfg.clients
    num_slots = per_round if cfg.engine == "batched" else 1
    preloaded = shared.get("model") if shared else None
    model, tokenizer = task.build_model(cfg, dataset, num_slots, rule, preloaded)
    train = task.encode(tokenizer, dataset.train, cfg)
    test = task.encode(tokenizer, dataset.test, cfg, test=True)
    note = getattr(task, "data_note", lambda a, b: None)(train, test)
    if note:
        log(f"data: {note}")
    parts, weights = _partition(cfg, train)
    data = {"name": getattr(dataset, "name", None), "clients": [len(p) for p in parts]}
    for split, enc in (("train", train), ("test", test)):
        stats = getattr(enc, "stats", None)
        data[split] = dict(stats) if stats else {"examples": len(enc)}
    return _Setup(task, method, rule, budgets, model, train, test, parts, weights, data)


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
    bar = _progress(cfg.rounds, start_round, progress)
    for r in range(start_round, cfg.rounds):
        global_state, row = _federated_round(r, cfg, s, server)
        result.rounds.append(row)
        bar_write = bar.write if bar is not None else log
        bar_write(
            f"round {r + 1:3d}/{cfg.rounds}  {s.task.round_line(row)}  "
            f"agg-err {row['aggregation_error']:.2e}  up {row['bytes_up'] / 2**20:.2f} MiB  "
            f"down {row['bytes_down'] / 2**20:.2f} MiB  {row['seconds']:.1f}s"
            + privacy_run.progress(row)  # --- differential privacy
        )
        if bar is not None:
            bar.update(1)
        if out is not None:
            write_outputs(
                out,
                cfg,
                result.rounds,
                global_state | _changed_bases(model, cfg),
                plot=plot,
                initial=result.initial,
                data=result.data,
            )
    if bar is not None:
        bar.close()
    result.global_state = global_state
    return result


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
    uploads, losses = [], []
    for group in groups:
        ups, ls = train_group(model, rule, group, s.train, cfg, r, s.task)
        uploads += ups
        losses += ls
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
    metrics = evaluate_global(model, s.task, global_state, s.test, cfg)
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
    }
    if cfg.clients_per_round is not None:
        row["sampled"] = sampled
    row.update(privacy_run.row_fields(agg))  # --- differential privacy: ε so far
    if isinstance(agg.get("scores"), dict):  # HAFL's averaged component scores (resume needs them)
        row["scores"] = {p: [float(x) for x in v.tolist()] for p, v in agg["scores"].items()}
    return global_state, row


BASE_SUFFIX = ".base_layer.weight"


def _changed_bases(model: nn.Module, cfg: SimConfig) -> dict[str, torch.Tensor]:
    """Frozen base weights that the run has changed (FLoRA, FedEx-LoRA), for the checkpoint."""
    if not get_method(cfg.method).changes_base:
        return {}
    return {
        f"{p}{BASE_SUFFIX}": m.base_layer.weight.detach().clone() for p, m in adapter_layers(model)
    }


def _restore_bases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy checkpointed base weights into the model; return the adapter state without them."""
    layers = dict(adapter_layers(model))
    rest = {}
    for key, value in state.items():
        if key.endswith(BASE_SUFFIX):
            with torch.no_grad():
                layers[key[: -len(BASE_SUFFIX)]].base_layer.weight.copy_(value)
        else:
            rest[key] = value
    return rest


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="rounds", unit="round", dynamic_ncols=True)


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
