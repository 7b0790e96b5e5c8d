"""The federated training loop: data, model, rounds, the two engines, metrics and checkpoints.

``sequential`` trains one client after another on a one-slot model (how FL frameworks
simulate). ``batched`` builds the model with one adapter slot per client and trains the whole
round in one forward/backward per step: each client's batch is a segment, the loss is the sum of
per-client mean losses (so each client's gradient is exactly its own), optimizer state is
stacked per slot, and clients with fewer local steps are masked out of later steps. Both engines
run the same code on the same batches (every random choice is keyed by seed, round and client),
so they give the same numbers up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedlora.methods import Client
from fedlora.methods import get as get_method
from fedlora.simulate.config import Budget, ConfigError, SimConfig, parse_budgets
from fedlora.simulate.optim import SlotAdamW
from fedlora.state_dict import (
    adapter_layers,
    apply_base_merges,
    get_adapter_state_dict,
    set_adapter_state_dict,
    slotted_modules,
)

EVAL_BATCH = 64


# ------------------------------------------------------------------------------------- data
@dataclass
class Tokenized:
    """A tokenized split: fixed-length ``input_ids`` / ``attention_mask`` ``[N, L]``, ``labels``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def take(self, idx: list[int] | torch.Tensor) -> Tokenized:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Tokenized(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])


def load_dataset(cfg: SimConfig):
    """The configured data set: ``--data`` file or the standard-library topics set."""
    from fedlora.data import build_stdlib_topics, load_text_file

    if cfg.data is None:
        return build_stdlib_topics()
    try:
        return load_text_file(cfg.data)
    except (ValueError, OSError) as err:
        raise ConfigError(f"--data: {err}") from None


def tokenize_split(
    tokenizer: Any, texts: list[str], labels: list[int], max_length: int
) -> Tokenized:
    try:
        enc = tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
    except (ValueError, TypeError) as err:  # e.g. a tokenizer without a padding token
        why = str(err).split(". ")[0][:200]
        raise ConfigError(f"--model: its tokenizer cannot encode the data ({why})") from None
    return Tokenized(
        enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels, dtype=torch.long)
    )


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


def _key(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % 2**61
    return h % 2**31


# ------------------------------------------------------------------------------------- model
def build_model(
    cfg: SimConfig, num_labels: int, num_slots: int, rule: Client, encoder_and_tok=None
):
    """Encoder with injected adapters (``num_slots`` slots) and a slotted classifier head."""
    from fedlora.injection import inject
    from fedlora.layers.head import SlottedLinear
    from fedlora.models import SequenceClassifier, load_encoder

    if encoder_and_tok is None:
        try:
            encoder_and_tok = load_encoder(cfg.model)
        except (ImportError, OSError, ValueError) as err:
            raise ConfigError(f"--model: {err}") from None
    encoder, tokenizer = encoder_and_tok
    _check_max_length(cfg, encoder)
    model = SequenceClassifier(encoder, num_labels)
    gen = torch.Generator().manual_seed(_key(cfg.seed, 7))
    head = nn.Linear(model.classifier.in_features, num_labels)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(head.in_features)
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    try:
        inject(
            model.encoder,
            cfg.method,
            target_modules=cfg.target_modules,
            seed=cfg.seed,
            num_clients=num_slots,
            **rule.layer_options(),
        )
    except ValueError as err:
        raise ConfigError(f"--target-modules: {err}") from None
    model.classifier = SlottedLinear(head, num_slots)
    model.eval()  # dropout off: the frozen base is deterministic, engines agree
    rule.setup(model)
    return model, tokenizer


def _check_max_length(cfg: SimConfig, encoder: nn.Module) -> None:
    """``--max-length`` fits the model's position embeddings (else round 1 fails indexing)."""
    limit = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.max_length > limit:
        raise ConfigError(f"--max-length {cfg.max_length} exceeds the model's {limit} positions")


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
    data: Tokenized,
    cfg: SimConfig,
    round_idx: int,
) -> tuple[list[tuple[dict, dict]], list[float]]:
    """Train ``jobs`` together, client ``i`` in slot ``i``; return uploads and last losses."""
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
        ids, masks, labels, offsets, slots, weights, owners, rank_masks = (
            [],
            [],
            [],
            [0],
            [],
            [],
            [],
            [],
        )
        for i in active:
            batch = data.take(jobs[i].batches[step])
            truncs = rule.truncations(jobs[i].budget)
            copies = truncs if truncs is not None else [None]
            for t in copies:
                ids.append(batch.input_ids)
                masks.append(batch.attention_mask)
                labels.append(batch.labels)
                offsets.append(offsets[-1] + len(batch.labels))
                slots.append(i)
                weights.append(1.0 / len(copies))
                owners.append(i)
                if t is not None:
                    m = torch.zeros(cfg.rank, dtype=torch.bool)
                    m[:t] = True
                else:
                    m = _slot_rank_mask(model, i, cfg.rank)
                rank_masks.append(m)
        off = torch.tensor(offsets)
        set_segments(model, off, torch.tensor(slots), torch.stack(rank_masks))
        logits = model(torch.cat(ids), torch.cat(masks))
        y = torch.cat(labels)
        loss = logits.new_zeros(())
        per_client: dict[int, float] = {}
        for s in range(len(slots)):
            seg = F.cross_entropy(
                logits[offsets[s] : offsets[s + 1]], y[offsets[s] : offsets[s + 1]]
            )
            loss = loss + weights[s] * seg
            per_client[owners[s]] = per_client.get(owners[s], 0.0) + weights[s] * seg.item()
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
def evaluate(
    model: nn.Module, global_state: dict[str, torch.Tensor], data: Tokenized
) -> tuple[float, float]:
    """Accuracy and mean loss of the global adapter (loaded into slot 0) on ``data``."""
    set_adapter_state_dict(model, global_state, slot=0)
    set_segments(model, None, None)
    correct, loss_sum = 0, 0.0
    for start in range(0, len(data.labels), EVAL_BATCH):
        sl = slice(start, start + EVAL_BATCH)
        logits = model(data.input_ids[sl], data.attention_mask[sl])
        loss_sum += float(F.cross_entropy(logits, data.labels[sl], reduction="sum"))
        correct += int((logits.argmax(-1) == data.labels[sl]).sum())
    n = max(1, len(data.labels))
    return correct / n, loss_sum / n


# ------------------------------------------------------------------------------------- run
@dataclass
class RunResult:
    """What :func:`run` returns: the config, per-round metrics and the final global state."""

    config: SimConfig
    rounds: list[dict[str, Any]] = field(default_factory=list)
    global_state: dict[str, torch.Tensor] = field(default_factory=dict)


def run(
    cfg: SimConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    shared=None,
    plot: bool | None = None,
) -> RunResult:
    """Run a whole federated experiment; write metrics, plot and checkpoint to ``out_dir``.

    Everything that can be checked is checked before the first round (the config, ``out_dir``
    by creating it and a probe file, the checkpoint when resuming, the data file, the model, the
    partition): any problem is a one-line :class:`ConfigError` and nothing is written.
    ``plot``: draw curves.png (None: when matplotlib imports; otherwise skip it with one
    warning). Stale temp files of a killed run are removed before the first write.
    """
    from fedlora.data import dirichlet_partition

    cfg.validate()
    budgets = parse_budgets(cfg)
    if out_dir is not None and not str(out_dir).strip():
        raise ConfigError("--out must name a directory, got ''")
    out = Path(out_dir).expanduser() if out_dir is not None else None
    result = RunResult(cfg)
    start_round = 0
    ckpt = None
    if out is not None:
        ckpt = check_out_dir(out, cfg, resume)
        if resume and ckpt is None:
            log(
                f"{out} holds no checkpoint yet (stopped before round 1 ended?); starting at round 1"
            )
    torch.manual_seed(cfg.seed)
    dataset = shared["dataset"] if shared else load_dataset(cfg)
    train, test = dataset.train, dataset.test
    try:
        parts = dirichlet_partition(train.labels, cfg.clients, cfg.dirichlet_alpha, seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(f"--clients {cfg.clients}: {err}") from None
    if cfg.max_train_per_client:
        parts = [p[: cfg.max_train_per_client] for p in parts]
    weights = [float(len(p)) for p in parts]
    method = get_method(cfg.method)
    rule = method.client(cfg.client_options(), budgets)
    num_slots = cfg.clients if cfg.engine == "batched" else 1
    model, tokenizer = build_model(
        cfg, dataset.num_classes, num_slots, rule, shared.get("encoder") if shared else None
    )
    train_tok = tokenize_split(tokenizer, train.texts, train.labels, cfg.max_length)
    test_idx = list(range(len(test.labels)))[: cfg.max_test or None]
    test_tok = tokenize_split(
        tokenizer,
        [test.texts[i] for i in test_idx],
        [test.labels[i] for i in test_idx],
        cfg.max_length,
    )
    global_state = get_adapter_state_dict(model, slot=0)
    if ckpt is not None:
        global_state, result.rounds = ckpt
        _check_resumable(model, cfg, global_state)
        global_state = _restore_bases(model, global_state)
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
            write_reports(out, cfg, result.rounds, plot=plot)

    # what the client side keeps from the server's last round (HAFL truncation's scores) and
    # the aggregate options it asks for; a resumed run replays the hook on the last recorded row
    server_options = dict(rule.after_aggregate(result.rounds[-1]) or {}) if result.rounds else {}
    bar = _progress(cfg.rounds, start_round, progress)
    for r in range(start_round, cfg.rounds):
        global_state, row, server_options = _federated_round(
            r,
            cfg,
            method,
            rule,
            model,
            parts,
            budgets,
            weights,
            global_state,
            train_tok,
            test_tok,
            server_options,
        )
        acc, test_loss = row["test_accuracy"], row["test_loss"]
        result.rounds.append(row)
        bar_write = bar.write if bar is not None else log
        bar_write(
            f"round {r + 1:3d}/{cfg.rounds}  acc {acc:.3f}  loss {test_loss:.3f}  "
            f"agg-err {row['aggregation_error']:.2e}  up {row['bytes_up'] / 2**20:.2f} MiB  "
            f"down {row['bytes_down'] / 2**20:.2f} MiB  {row['seconds']:.1f}s"
        )
        if bar is not None:
            bar.update(1)
        if out is not None:
            write_outputs(
                out, cfg, result.rounds, global_state | _changed_bases(model, cfg), plot=plot
            )
    if bar is not None:
        bar.close()
    result.global_state = global_state
    return result


def _federated_round(
    r: int,
    cfg: SimConfig,
    method: Any,
    rule: Client,
    model: nn.Module,
    parts: list[list[int]],
    budgets: list[Budget],
    weights: list[float],
    global_state: dict[str, torch.Tensor],
    train_tok: Tokenized,
    test_tok: Tokenized,
    server_options: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Round ``r``: every client downloads, trains (one group or one per client, by engine) and
    uploads; the server aggregates (with ``server_options``, what the client side's
    ``after_aggregate`` asked for last round); the new global is evaluated. Returns it, the
    round's row and the next round's ``server_options``."""
    from fedlora import aggregate
    from fedlora.methods.prefix import nbytes

    t0 = time.perf_counter()
    jobs = [
        ClientJob(
            k,
            budgets[k],
            client_batches(
                parts[k],
                cfg.batch_size,
                rule.pre_steps(budgets[k]) + budgets[k].steps,
                cfg.seed,
                r,
                k,
            ),
            rule.download(global_state, budgets[k]),
            _key(cfg.seed, r, k, 11),
        )
        for k in range(cfg.clients)
    ]
    groups = [jobs] if cfg.engine == "batched" else [[j] for j in jobs]
    uploads, losses = [], []
    for group in groups:
        ups, ls = train_group(model, rule, group, train_tok, cfg, r)
        uploads += ups
        losses += ls
    states = [u[0] for u in uploads]
    metas = [u[1] for u in uploads]
    options = method.round_options(_key(cfg.seed, r, 13)) if method.round_options else {}
    options = {**(server_options or {}), **options}
    new_state, agg = aggregate(
        cfg.method, global_state, states, weights, metas, error=True, **options
    )
    # FLoRA / FedEx-LoRA: fold the server's merge instructions into the shared frozen base
    global_state = apply_base_merges(model, new_state)
    acc, test_loss = evaluate(model, global_state, test_tok)
    row = {
        "round": r + 1,
        "test_accuracy": acc,
        "test_loss": test_loss,
        "train_loss": float(sum(losses) / len(losses)),
        "aggregation_error": float(agg.get("aggregation_error", float("nan"))),
        "bytes_up": int(sum(nbytes(s) for s in states)),
        "bytes_down": int(sum(nbytes(j.state) for j in jobs)),
        "clients_used": int(
            agg.get("clients_used", len(states))
            if not isinstance(agg.get("clients_used"), list)
            else len(agg["clients_used"])
        ),
        "rejected": agg.get("rejected", []),
        "seconds": time.perf_counter() - t0,
    }
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


# ------------------------------------------------------------------------------------- outputs
#: The checkpoint: ONE safetensors file (the global adapter state, plus the frozen base weights
#: FLoRA / FedEx-LoRA changed) whose header metadata holds, under ``CKPT_META_KEY``, the JSON of
#: ``{"format", "config", "config_fingerprint", "rounds"}`` and, under ``CKPT_DIGEST_KEY``, a
#: SHA-256 over every tensor (name, dtype, shape, bytes) and that JSON text. It is written to a
#: temp file in the same directory, fsync'd and renamed over the old one, so a kill at any instant
#: leaves either the previous round's checkpoint or this round's, never a mix.
CKPT = "checkpoint.safetensors"
CKPT_META_KEY = "fedlora_checkpoint"
CKPT_DIGEST_KEY = "fedlora_sha256"
CKPT_FORMAT = 2
#: The two-file checkpoint of format 1 (tensors and JSON replaced one after the other).
LEGACY_CKPT_JSON = "checkpoint.json"
REPORTS = ("metrics.json", "metrics.csv", "curves.png")
OUTPUT_NAMES = (CKPT, *REPORTS)
_PROBE = "fedlora-probe"
_TMP_SUFFIX = ".tmp"
#: Files whose temp copies (``.<name>.<random>.tmp``) are ours to clean up.
_COMPARE_OUTPUTS = ("results.md", "results.json")
_PLOT_HINT = "pip install 'fedlora-kernels[plot]'"


def _out_error(out: Path, problem: str) -> ConfigError:
    return ConfigError(f"--out {str(out)!r}: {problem}")


def _check_out_path(out: Path) -> None:
    """``out`` is, or can become, a directory: not a file, not under a file (read-only check)."""
    try:
        kinds = [(p, p.exists(), p.is_dir()) for p in (out, *out.parents)]
    except (OSError, ValueError) as err:  # embedded NUL byte, name too long, ...
        raise _out_error(out, getattr(err, "strerror", None) or str(err)) from None
    for path, exists, is_dir in kinds:
        if exists:
            if not is_dir:
                where = "" if path == out else f"{str(path)!r} "
                raise _out_error(out, f"{where}is a file, not a directory")
            return


def probe_writable(out: Path) -> None:
    """Create ``out`` (and its parents) and a probe file in it, then remove the probe: the output
    directory is writable before any training. On failure the directories it created are removed
    again and a :class:`ConfigError` says why."""
    _check_out_path(out)
    created = [d for d in (out, *out.parents) if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".{_PROBE}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, b"fedlora")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except (OSError, ValueError) as err:  # ValueError: an embedded NUL byte
        for d in created:  # deepest first
            with contextlib.suppress(OSError, ValueError):
                d.rmdir()
        why = getattr(err, "strerror", None) or str(err)
        raise _out_error(out, f"not writable ({why})") from None


def _is_own_temp(name: str) -> bool:
    return name.endswith(_TMP_SUFFIX) and any(
        name.startswith(f".{n}.") for n in (*OUTPUT_NAMES, *_COMPARE_OUTPUTS, _PROBE)
    )


def clean_stale_temps(out: Path) -> list[str]:
    """Remove the temp files a killed run of ours left in ``out``; return their names."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in out.iterdir():
            if _is_own_temp(entry.name) and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry.name)
    return removed


def _tensor_digest(tensors: dict[str, torch.Tensor], meta_text: str) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(meta_text.encode())
    return h.hexdigest()


def write_checkpoint(
    out: Path, cfg: SimConfig, rounds: list[dict], state: dict[str, torch.Tensor]
) -> None:
    """Write the whole checkpoint (tensors and metadata) as one atomically replaced file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta_text = json.dumps(
        {
            "format": CKPT_FORMAT,
            "config": cfg.to_json(),
            "config_fingerprint": cfg.fingerprint(),
            "rounds": rounds,
        }
    )
    header = {CKPT_META_KEY: meta_text, CKPT_DIGEST_KEY: _tensor_digest(tensors, meta_text)}
    _atomic_write(out / CKPT, lambda p: save_file(tensors, p, metadata=header))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a checkpoint written by :func:`write_checkpoint`.

    Raises:
        ConfigError: (one line) the file is truncated, corrupted (digest mismatch), not a fedlora
            checkpoint, or of another format version.
    """
    from safetensors import safe_open

    def corrupt(why: str) -> ConfigError:
        return ConfigError(
            f"checkpoint {str(path)!r} is corrupted or truncated ({why}); start over in an "
            "empty --out"
        )

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error type for every malformation
        raise corrupt(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    meta_text, digest = header.get(CKPT_META_KEY), header.get(CKPT_DIGEST_KEY)
    if meta_text is None or digest is None:
        raise corrupt("no fedlora metadata in its header")
    if _tensor_digest(tensors, meta_text) != digest:
        raise corrupt("its SHA-256 digest does not match its contents")
    try:
        meta = json.loads(meta_text)
    except ValueError:
        raise corrupt("its metadata is not JSON") from None
    rounds = meta.get("rounds") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CKPT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise corrupt(f"format {got!r}, expected {CKPT_FORMAT}")
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise corrupt("its metadata has no list of rounds")
    if [r.get("round") for r in rounds] != list(range(1, len(rounds) + 1)):
        raise corrupt("its rounds are not numbered 1, 2, ...")
    return tensors, meta


def check_out_dir(
    out: Path, cfg: SimConfig, resume: bool
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]] | None:
    """Refuse to mix runs; return ``(global_state, rounds)`` to resume, or None to start fresh.

    Read-only: raises :class:`ConfigError` when ``out`` is a file or under one, holds another
    config's run, holds this run without ``resume``, holds an old two-file or a corrupted
    checkpoint, or holds another run's reports without a checkpoint.
    """
    _check_out_path(out)
    if (out / LEGACY_CKPT_JSON).exists():
        raise _out_error(
            out,
            f"holds a checkpoint in the old two-file format ({LEGACY_CKPT_JSON} + {CKPT}), "
            "which cannot be resumed safely; choose another directory",
        )
    path = out / CKPT
    if not path.exists():
        reports = [n for n in REPORTS if (out / n).exists()]
        if reports:
            raise _out_error(
                out,
                f"holds {reports[0]} of another run but no checkpoint; choose another directory",
            )
        if resume and not out.is_dir():
            raise ConfigError(f"--resume: {str(out)!r} holds no checkpoint to resume")
        return None  # resuming a run killed before its first checkpoint: start at round 1
    try:
        state, meta = read_checkpoint(path)
    except ConfigError as err:
        raise ConfigError(f"{'--resume' if resume else '--out'}: {err}") from None
    if meta.get("config_fingerprint") != cfg.fingerprint():
        raise _out_error(out, "holds a run of a different config; choose another directory")
    if not resume:
        raise _out_error(out, "already holds this run; pass --resume to continue it")
    return state, meta["rounds"]


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


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # a directory cannot be opened on some systems
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by the
    classic set-and-restore."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp)``: a temp file next to it, given the mode a plain
    ``open`` would give (0o666 minus the umask: some writers create 0o600 files), fsync'd, then
    renamed over ``path``. On any failure the temp file is removed and ``path`` is unchanged."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def matplotlib_missing() -> str | None:
    """Why ``curves.png`` cannot be drawn (matplotlib does not import), or None if it can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        return str(err) or "matplotlib is not installed"
    return None


def check_plotting(plot: bool | None) -> bool:
    """Whether to draw curves: ``plot`` if given, otherwise whether matplotlib imports (with one
    warning on stderr when it does not: the metrics are the essential output)."""
    if plot is not None:
        return plot
    why = matplotlib_missing()
    if why is not None:
        print(
            f"fedlora: warning: curves.png is not written: matplotlib is unavailable ({why}); "
            f"`{_PLOT_HINT}` to get it",
            file=sys.stderr,
        )
    return why is None


def write_reports(out: Path, cfg: SimConfig, rounds: list[dict], *, plot: bool = True) -> None:
    """metrics.json, metrics.csv and (with ``plot``) curves.png, each written atomically."""
    _atomic_write(
        out / "metrics.json",
        lambda p: Path(p).write_text(
            json.dumps({"config": cfg.to_json(), "rounds": rounds}, indent=1)
        ),
    )
    cols = [
        "round",
        "test_accuracy",
        "test_loss",
        "train_loss",
        "aggregation_error",
        "bytes_up",
        "bytes_down",
        "clients_used",
        "seconds",
    ]
    lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rounds]
    _atomic_write(out / "metrics.csv", lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    if plot:
        plot_curves({cfg.method: rounds}, out / "curves.png")


def write_outputs(
    out: Path,
    cfg: SimConfig,
    rounds: list[dict],
    global_state: dict[str, torch.Tensor],
    *,
    plot: bool = True,
) -> None:
    """The checkpoint first (the source of truth a resume reads), then the reports derived from
    it; every file is written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(out, cfg, rounds, global_state)
    write_reports(out, cfg, rounds, plot=plot)


def plot_curves(runs: dict[str, list[dict]], path: Path) -> None:
    """Accuracy and loss per round, one line per run, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rounds in runs.items():
        x = [r["round"] for r in rounds]
        ax1.plot(x, [r["test_accuracy"] for r in rounds], marker="o", label=name)
        ax2.plot(x, [r["test_loss"] for r in rounds], marker="o", label=name)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set(xlabel="round", ylabel="test accuracy", title="global test accuracy")
    ax2.set(xlabel="round", ylabel="test loss", title="global test loss")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    try:
        _atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    finally:
        plt.close(fig)
