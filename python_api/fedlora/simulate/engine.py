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

from fedlora.methods import Client
from fedlora.methods import get as get_method
from fedlora.simulate.config import Budget, ConfigError, SimConfig, parse_budgets
from fedlora.simulate.optim import SlotAdamW
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
    matplotlib_missing,
    plot_curves,
    probe_writable,
    read_checkpoint,
    write_checkpoint,
    write_outputs,
    write_reports,
)
from fedlora.simulate.seeding import key as _key
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
    slotted_modules,
)


# ------------------------------------------------------------------------------------- data
def client_batches(
    indices: list[int], batch_size: int, steps: int, seed: int, round_idx: int, client: int
) -> list[list[int]]:
    """``steps`` batches for one client in one round: a fresh seeded shuffle, cycled as needed."""
    gen = torch.Generator().manual_seed(_key(seed, round_idx, client))
    order: list[int] = []
    need = steps * batch_size
    while len(order) < need:
        order += [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def sample_clients(cfg: SimConfig, round_idx: int) -> list[int]:
    """The clients of round ``round_idx`` (0-based), in increasing order: all of them, or
    ``clients_per_round`` drawn without replacement by a generator seeded with (seed, round),
    so a resumed run and both engines draw the same ones."""
    k = cfg.clients_per_round
    if k is None or k >= cfg.clients:
        return list(range(cfg.clients))
    gen = torch.Generator().manual_seed(_key(cfg.seed, round_idx, 17))
    return sorted(torch.randperm(cfg.clients, generator=gen)[:k].tolist())


def set_segments(
    model: nn.Module,
    offsets: torch.Tensor | None,
    slots: torch.Tensor | None,
    rank_mask: torch.Tensor | None = None,
) -> None:
    """Route example segments to slots in every slotted module of ``model``."""
    from fedlora.layers.lora import LoRALinear

    for _, module in slotted_modules(model):
        if offsets is None:
            module.set_segments(None)
        elif isinstance(module, LoRALinear):
            module.set_segments(offsets, slots, rank_mask)
        else:
            module.set_segments(offsets, slots)


# ------------------------------------------------------------------------------------- training
@dataclass
class ClientJob:
    """One client's work in a round."""

    client: int
    budget: Budget
    batches: list[list[int]]
    state: dict[str, torch.Tensor]
    seed: int


def train_group(
    model: nn.Module,
    rule: Client,
    jobs: list[ClientJob],
    data: Batch,
    cfg: SimConfig,
    round_idx: int,
    task: Task | None = None,
) -> tuple[list[tuple[dict, dict]], list[float]]:
    """Train ``jobs`` together, client ``i`` in slot ``i``; return uploads and last losses.

    Each step concatenates the active clients' batches (a client training under several rank
    truncations at once contributes one copy per truncation, weighted equally), routes each
    segment to its slot and takes one masked AdamW step on the slots that train."""
    task = task or get_task(cfg.task)
    device = model_device(model)
    rule.start_round(model, round_idx)
    for slot, job in enumerate(jobs):
        rule.prepare(model, slot, job.state, job.budget, job.seed)
    opt = SlotAdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    num_slots = opt.num_slots
    pre = [rule.pre_steps(j.budget) for j in jobs]
    for slot, job in enumerate(jobs):
        if pre[slot] == 0:  # nothing to score first: choose what trains now
            rule.scoring_done(model, slot, job.budget, job.seed)
    total = [p + j.budget.steps for p, j in zip(pre, jobs, strict=True)]
    last_loss = [float("nan")] * len(jobs)
    for step in range(max(total)):
        active = [i for i, j in enumerate(jobs) if step < total[i]]
        parts, offsets, slots, weights, rank_masks = [], [0], [], [], []
        for i in active:
            part = data.take(jobs[i].batches[step])
            truncs = rule.truncations(jobs[i].budget)
            copies = truncs if truncs is not None else [None]
            for t in copies:
                parts.append(part)
                offsets.append(offsets[-1] + len(part))
                slots.append(i)
                weights.append(1.0 / len(copies))
                if t is not None:
                    m = torch.zeros(cfg.rank, dtype=torch.bool)
                    m[:t] = True
                else:
                    m = _slot_rank_mask(model, i, cfg.rank)
                rank_masks.append(m)
        set_segments(
            model, torch.tensor(offsets), torch.tensor(slots), torch.stack(rank_masks).to(device)
        )
        seg_losses = task.segment_losses(model, task.cat(parts).to(device), offsets)
        loss = seg_losses[0].new_zeros(())
        per_client: dict[int, float] = {}
        for s, seg in enumerate(seg_losses):
            loss = loss + weights[s] * seg
            per_client[slots[s]] = per_client.get(slots[s], 0.0) + weights[s] * float(seg.detach())
        opt.zero_grad()
        loss.backward()
        rule.after_backward(model, active)
        train_now = torch.zeros(num_slots, dtype=torch.bool)
        for i in active:
            if step >= pre[i]:
                train_now[i] = True
                last_loss[i] = per_client[i]
        opt.step(train_now)
        for i in active:
            if step + 1 == pre[i]:
                rule.scoring_done(model, i, jobs[i].budget, jobs[i].seed)
    set_segments(model, None, None)
    uploads = [rule.upload(model, slot, job.budget) for slot, job in enumerate(jobs)]
    return uploads, last_loss


def _slot_rank_mask(model: nn.Module, slot: int, rank: int) -> torch.Tensor:
    from fedlora.layers.lora import LoRALinear

    for m in model.modules():
        if isinstance(m, LoRALinear):
            return m.rank_mask[slot].detach().cpu().clone()
    return torch.ones(rank, dtype=torch.bool)


@torch.no_grad()
def evaluate_global(
    model: nn.Module, task: Task, global_state: dict[str, torch.Tensor], test: Any, cfg: SimConfig
) -> dict[str, Any]:
    """The task's metrics of the global adapter (loaded into slot 0) on ``test``."""
    set_adapter_state_dict(model, global_state, slot=0)
    set_segments(model, None, None)
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

    # what the client side keeps from the server's last round (HAFL truncation's scores) and
    # the aggregate options it asks for; a resumed run replays the hook on the last recorded row
    server_options = dict(s.rule.after_aggregate(result.rounds[-1]) or {}) if result.rounds else {}
    bar = _progress(cfg.rounds, start_round, progress)
    for r in range(start_round, cfg.rounds):
        global_state, row, server_options = _federated_round(
            r, cfg, s, global_state, server_options
        )
        result.rounds.append(row)
        bar_write = bar.write if bar is not None else log
        bar_write(
            f"round {r + 1:3d}/{cfg.rounds}  {s.task.round_line(row)}  "
            f"agg-err {row['aggregation_error']:.2e}  up {row['bytes_up'] / 2**20:.2f} MiB  "
            f"down {row['bytes_down'] / 2**20:.2f} MiB  {row['seconds']:.1f}s"
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
    r: int,
    cfg: SimConfig,
    s: _Setup,
    global_state: dict[str, torch.Tensor],
    server_options: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Round ``r``: the round's clients (all, or ``clients_per_round`` sampled) download, train
    (one group or one per client, by engine) and upload; the server aggregates (with
    ``server_options``, what the client side's ``after_aggregate`` asked for last round); the new
    global is evaluated. Returns it, the round's row and the next round's ``server_options``."""
    from fedlora import aggregate
    from fedlora.methods.prefix import nbytes

    t0 = time.perf_counter()
    rule, budgets, model = s.rule, s.budgets, s.model
    sampled = sample_clients(cfg, r)
    jobs = [
        ClientJob(
            k,
            budgets[k],
            client_batches(
                s.parts[k],
                cfg.batch_size,
                rule.pre_steps(budgets[k]) + budgets[k].steps,
                cfg.seed,
                r,
                k,
            ),
            rule.download(global_state, budgets[k]),
            _key(cfg.seed, r, k, 11),
        )
        for k in sampled
    ]
    groups = [jobs] if cfg.engine == "batched" else [[j] for j in jobs]
    uploads, losses = [], []
    for group in groups:
        ups, ls = train_group(model, rule, group, s.train, cfg, r, s.task)
        uploads += ups
        losses += ls
    states = [u[0] for u in uploads]
    metas = [u[1] for u in uploads]
    options = s.method.round_options(_key(cfg.seed, r, 13)) if s.method.round_options else {}
    # the method's server-side options (PreLort's / HAFL's aggregation), then the hand-back
    options = {**rule.server_options(), **(server_options or {}), **options}
    weights = [s.weights[k] for k in sampled]
    new_state, agg = aggregate(
        cfg.method, global_state, states, weights, metas, error=True, **options
    )
    # FLoRA / FedEx-LoRA: fold the server's merge instructions into the shared frozen base
    global_state = apply_base_merges(model, new_state)
    metrics = evaluate_global(model, s.task, global_state, s.test, cfg)
    used = agg.get("clients_used", len(states))
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
    for key in s.method.logged:  # per-round diagnostics the method asks to keep (segment norms)
        if key in agg:
            row[key] = agg[key]
    if isinstance(agg.get("scores"), dict):  # HAFL's averaged component scores (resume needs them)
        row["scores"] = {p: [float(x) for x in v.tolist()] for p, v in agg["scores"].items()}
    return global_state, row, dict(rule.after_aggregate(agg) or {})


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
