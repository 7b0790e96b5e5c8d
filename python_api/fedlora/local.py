"""One client's local work for any registered method: the client half of the backend (DESIGN §5.1).

A federated round has two halves. The server's is :func:`fedlora.aggregate` with the bookkeeping
of :mod:`fedlora.rounds`; this module is the client's. Given the method, a model with the
method's adapters injected (:func:`fedlora.inject`), the downloaded global state, the client's
budget and its batches, :class:`LocalClient` runs the method's client hooks exactly as
``fedlora simulate`` does (load the download into a slot, scoring steps, head or component
selection, nested truncations, masked AdamW) and returns the upload: state dict, meta, number of
examples and local metrics. A Flower ClientApp, another FL framework's client, or a script calls
it; the simulator's sequential engine is a loop over it and its batched engine runs the same
function (:func:`train_slots`) over many slots at once.

Every random choice of a client is seeded by :func:`client_seed` and its batches are drawn by
:func:`sample_batches` (both keyed by run seed, round and client id, never by call order), so
the same method with the same seed gives the same numbers (bitwise on CPU) through ``fedlora
simulate``, this module and Flower.

Example (one client of one round, any framework)::

    import fedlora
    from fedlora.local import LocalClient

    model = fedlora.inject(base_model, "prelort", target_modules=["q_proj", "v_proj"], rank=8)
    client = LocalClient("prelort", model, loss=lambda m, batch: m(**batch).loss, lr=1e-3)
    result = client.train(download, fedlora.methods.Budget(rank=4, heads=1, components=4, steps=5),
                          batches, seed=fedlora.local.client_seed(0, round_idx, client_id))
    send(result.state, result.meta, result.num_examples)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fedlora import keys
from fedlora.methods import Budget, Client, ClientOptions, Method
from fedlora.methods import get as get_method
from fedlora.seeding import key

__all__ = [
    "Job",
    "LocalClient",
    "LocalResult",
    "SegmentLoss",
    "TrainOptions",
    "auto_tokens_per_pass",
    "client_seed",
    "decoder_blocks",
    "lr_factors",
    "route_segments",
    "sample_batches",
    "train_slots",
]

#: purpose tags of the seed rule (:func:`fedlora.seeding.key`): one per kind of random choice
CLIENT_TAG = 11


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """The seed of client ``client``'s own random choices in round ``round_idx`` (0-based) of a
    run seeded ``seed`` (Ravan's random heads, HAFL's tie breaks, PreLort's sampled truncation).
    The one rule every caller uses: the simulator's engines, :class:`LocalClient`, Flower."""
    return key(seed, round_idx, client, CLIENT_TAG)


def sample_batches(
    indices: Sequence[int], batch_size: int, steps: int, seed: int, round_idx: int, client: int
) -> list[list[int]]:
    """``steps`` batches of ``batch_size`` example indices for one client in one round: a fresh
    shuffle seeded by ``(seed, round_idx, client)``, cycled as needed."""
    if not indices:
        raise ValueError(f"client {client} has no examples to draw batches from")
    if batch_size < 1 or steps < 0:
        raise ValueError(f"batch_size must be >= 1 and steps >= 0, got {batch_size}, {steps}")
    gen = torch.Generator().manual_seed(key(seed, round_idx, client))
    order: list[int] = []
    need = steps * batch_size
    while len(order) < need:
        order += [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def route_segments(
    model: nn.Module,
    offsets: torch.Tensor | None,
    slots: torch.Tensor | None = None,
    rank_mask: torch.Tensor | None = None,
) -> None:
    """Route the next forward's example segments to adapter slots in every slotted module
    (``None``: everything to slot 0, no truncation), through ONE
    :class:`fedlora.layers.SegmentPlan` shared by every layer (validated, copied to the device
    and planned once per batch). ``rank_mask`` ``[S, R]`` truncates LoRA segments (PreLort's
    nested ranks); other layers ignore it."""
    from fedlora.layers.segments import SegmentPlan, route

    if offsets is None:
        route(model, None)
        return
    device = next(model.parameters()).device
    route(model, SegmentPlan(offsets, slots, rank_mask, device=device))


# ------------------------------------------------------------------------------------- losses
@runtime_checkable
class SegmentLoss(Protocol):
    """A loss over several clients' batches in one forward (the simulator's tasks are ones):
    ``cat`` joins batches in order, ``segment_losses`` returns the mean loss of each segment
    ``offsets[t]:offsets[t+1]`` of the joined batch (after :func:`route_segments`)."""

    def cat(self, batches: list[Any]) -> Any: ...

    def segment_losses(self, model: nn.Module, batch: Any, offsets: list[int]) -> list[Any]: ...


LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _leading(batch: Any) -> int:
    """The number of examples of a user batch (its tensors' leading size)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (Mapping, list, tuple)) or hasattr(values, "__iter__"):
        for v in values:
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
    for name in ("input_ids", "x"):
        v = getattr(batch, name, None)
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    if hasattr(batch, "__len__"):
        return len(batch)
    raise TypeError(
        "batches: cannot tell how many examples a batch holds; give tensors, a dict/tuple of "
        f"tensors or an object with __len__, got {type(batch).__name__}"
    )


def _to(batch: Any, device: torch.device) -> Any:
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _check_loss(value: Any, first: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss must return a torch.Tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"loss must return a scalar, got a tensor of shape {list(value.shape)}")
    if not value.requires_grad:
        raise ValueError(
            "loss must depend on the adapters (its result does not require grad): compute it "
            "from the model's output"
        )
    if first and not bool(torch.isfinite(value.detach()).all()):
        raise ValueError(f"loss is {float(value.detach())} at the first step (NaN or inf)")
    return value.reshape(())


# ------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One client's work in a round: who, under which budget, from which download, on which
    batches (``pre_steps + budget.steps`` of them, in order), with which seed."""

    client: int
    budget: Budget
    download: dict[str, torch.Tensor]
    batches: Sequence[Any]
    seed: int
    num_examples: int = 0


@dataclass
class LocalResult:
    """What one client sends back: the upload for :func:`fedlora.aggregate` (``state``,
    ``meta``), its weight (``num_examples``) and local ``metrics`` (``train_loss``: the mean loss
    of the last training step; ``train_loss_mean``: over all training steps; ``steps``);
    ``step_losses``: the training loss of each training step, in order."""

    state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    step_losses: list[float] = field(default_factory=list)


def _rank_mask(model: nn.Module, slot: int, rank: int, truncation: int | None) -> torch.Tensor:
    if truncation is not None:
        m = torch.zeros(rank, dtype=torch.bool)
        m[:truncation] = True
        return m
    from fedlora.layers.lora import LoRALinear

    for module in model.modules():
        if isinstance(module, LoRALinear):
            return module.rank_mask[slot].detach().cpu().clone()
    return torch.ones(rank, dtype=torch.bool)


# ------------------------------------------------------------------------------------- knobs
#: learning-rate schedules: transformers' ``get_scheduler`` names whose schedule is a factor of
#: the step (``constant`` with warmup is ``constant_with_warmup``)
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
)
#: purpose tag of the seed of a step's dropout masks
DROPOUT_TAG = 13


@dataclass(frozen=True)
class TrainOptions:
    """The local loop's knobs (every default leaves the plain loop unchanged).

    ``lr_scheduler``: one of :data:`LR_SCHEDULERS` (transformers' ``get_scheduler``), over each
    client's own training steps of the round (a client restarts its schedule every round, as its
    AdamW state does), with ``warmup_steps`` or ``warmup_ratio`` (``ceil(ratio * steps)``; give
    one). ``max_grad_norm``: clip each client's gradient (all its adapter tensors together, as
    ``torch.nn.utils.clip_grad_norm_`` over its parameters) before its step. ``grad_accum``: each
    batch runs as that many equal micro-batches whose gradients add up before one step (each
    micro-batch's mean loss divided by ``grad_accum``, as transformers' Trainer); it must
    divide every batch. ``lora_dropout``: dropout on the adapter input while training (PEFT's
    ``lora_dropout``), its masks seeded by (client seed, step, copy, micro-batch).
    ``max_tokens_per_pass``: the most tokens (sequences x padded width) one forward/backward
    holds; a step's client segments are packed into passes under it and their gradients add
    up before one optimizer step. ``None``: automatic (CPU: one client segment per pass, through
    the same ops whatever the grouping; CUDA: from the free memory, :func:`auto_tokens_per_pass`).
    ``gradient_checkpointing``: recompute the decoder blocks' activations in the backward pass
    (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant) instead of storing them.
    """

    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = None
    grad_accum: int = 1
    lora_dropout: float = 0.0
    max_tokens_per_pass: int | None = None
    gradient_checkpointing: bool = False

    def check(self) -> TrainOptions:
        """``self`` if every knob is valid; ValueError/TypeError naming the knob otherwise."""
        if not isinstance(self.lr_scheduler, str) or self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(
                f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}; got {self.lr_scheduler!r}"
            )
        for name in ("warmup_steps", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (name == "grad_accum"):
                low = 1 if name == "grad_accum" else 0
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if self.max_tokens_per_pass is not None:
            v = self.max_tokens_per_pass
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"max_tokens_per_pass must be a positive int or None, got {v!r}")
        _check_real("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=False)
        _check_real("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        if self.max_grad_norm is not None:
            _check_real("max_grad_norm", self.max_grad_norm, 0.0, math.inf, low_open=True)
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("warmup_steps and warmup_ratio: give one of them, not both")
        if not isinstance(self.gradient_checkpointing, bool):
            raise TypeError(
                f"gradient_checkpointing must be a bool, got {type(self.gradient_checkpointing)}"
            )
        return self


def _check_real(
    name: str, v: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise ValueError(f"{name} must be a number, got {v!r}")
    if v < low or (low_open and v == low) or v > high or (high_open and v == high) or v == math.inf:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} must be in {lo}{low:g}, {high:g}{hi}, got {v!r}")


def lr_factors(options: TrainOptions, steps: int, lr: float) -> list[float]:
    """The learning rate of each of ``steps`` training steps under ``options``' schedule
    (transformers' ``get_scheduler``, evaluated once, without a real optimizer)."""
    return list(_lr_factors(options.lr_scheduler, steps, _warmup(options, steps), float(lr)))


def _warmup(options: TrainOptions, steps: int) -> int:
    return options.warmup_steps or math.ceil(options.warmup_ratio * steps)


@functools.lru_cache(maxsize=64)
def _lr_factors(name: str, steps: int, warmup: int, lr: float) -> tuple[float, ...]:
    if name == "constant" and not warmup:
        return (lr,) * steps
    if name == "constant" or (name == "constant_with_warmup" and not warmup):
        name = "constant_with_warmup"
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_scheduler(name, dummy, num_warmup_steps=warmup, num_training_steps=max(steps, 1))
    return tuple(lr * float(sched.lr_lambdas[0](t)) for t in range(steps))


def auto_tokens_per_pass(model: nn.Module, checkpointing: bool = False) -> int | None:
    """The automatic pass budget: ``None`` on CPU (every client segment is its own pass: a CPU
    gains nothing from larger matrix products, and the numbers do not depend on the grouping);
    on CUDA, the tokens whose activations fit in 40 % of the free memory, by a conservative
    per-token estimate (per decoder layer ~24 hidden-size vectors in the base dtype, 2 with
    checkpointing; float32 logits, softmax and their gradient for a predicted position)."""
    param = next(model.parameters())
    if param.device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(param.device)
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 1024) or 1024)
    layers = int(getattr(config, "num_hidden_layers", 24) or 24)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    per_token = layers * hidden * param.element_size() * (2 if checkpointing else 24)
    per_token += 3 * 4 * vocab
    return max(256, int(0.4 * free / max(per_token, 1)))


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (the longest ``nn.ModuleList`` of modules of one class: a
    decoder's or encoder's layers), which gradient checkpointing wraps."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if len({type(m) for m in module}) == 1:
                best = list(module)
    return best


@contextlib.contextmanager
def _training_knobs(model: nn.Module, options: TrainOptions) -> Iterator[None]:
    """Adapter dropout on (the adapter layers' own ``training`` flag, nothing else's) and the
    blocks checkpointed, for the duration of the loop; everything restored after."""
    from torch.utils.checkpoint import checkpoint

    from fedlora.layers import AdapterLayer

    changed: list[tuple[nn.Module, float, bool]] = []
    wrapped: list[nn.Module] = []
    try:
        if options.lora_dropout:
            for m in model.modules():
                if isinstance(m, AdapterLayer):
                    changed.append((m, m.lora_dropout, m.training))
                    m.lora_dropout, m.training = float(options.lora_dropout), True
        if options.gradient_checkpointing:
            for block in decoder_blocks(model):
                if "forward" in block.__dict__:  # already wrapped (nested loops)
                    continue
                inner = block.forward

                def forward(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
                    if torch.is_grad_enabled():
                        return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                    return _inner(*args, **kwargs)

                block.forward = forward
                wrapped.append(block)
        yield
    finally:
        for m, p, flag in changed:
            m.lora_dropout, m.training = p, flag
        for block in wrapped:
            del block.forward


# ------------------------------------------------------------------------------------- passes
@dataclass
class _Unit:
    """One segment of a step: a client's (micro-)batch under one rank truncation."""

    slot: int
    part: Any
    weight: float
    mask: torch.Tensor
    seed: int


def _size(part: Any, segment: bool) -> tuple[int, int]:
    """``(sequences, padded width)`` of a batch (width 1 when it has no sequence axis)."""
    rows = len(part) if segment else _leading(part)
    mask = getattr(part, "attention_mask", None)
    if mask is None and isinstance(part, Mapping):
        mask = part.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel():
        return rows, max(1, int(mask.sum(1).max()))
    ids = getattr(part, "input_ids", None)
    if ids is None and isinstance(part, Mapping):
        ids = part.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return rows, int(ids.shape[1])
    return rows, 1


def _slice(batch: Any, a: int, b: int) -> Any:
    """Examples ``a:b`` of a batch (a task batch's ``take``, or tensors' leading rows)."""
    if hasattr(batch, "take"):
        return batch.take(list(range(a, b)))
    if isinstance(batch, torch.Tensor):
        return batch[a:b]
    if isinstance(batch, Mapping):
        return {k: _slice(v, a, b) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(_slice(v, a, b) for v in batch)
    if isinstance(batch, (list, tuple)):
        return batch[a:b]
    raise TypeError(f"batches: cannot split a {type(batch).__name__} for grad_accum")


def _passes(units: list[_Unit], budget: int | None, segment: bool) -> list[list[_Unit]]:
    """Consecutive units packed into passes of at most ``budget`` tokens (a unit larger than
    the budget is a pass by itself); one unit per pass when ``budget`` is None or the loss
    cannot join batches."""
    if budget is None or not segment:
        return [[u] for u in units]
    out: list[list[_Unit]] = []
    cur: list[_Unit] = []
    rows = width = 0
    for u in units:
        r, w = _size(u.part, segment)
        if cur and (rows + r) * max(width, w) > budget:
            out.append(cur)
            cur, rows, width = [], 0, 0
        cur.append(u)
        rows, width = rows + r, max(width, w)
    if cur:
        out.append(cur)
    return out


def _run_pass(
    model: nn.Module,
    loss: SegmentLoss | LossFn,
    units: list[_Unit],
    device: torch.device,
    first: bool,
    dropout: bool,
) -> list[float]:
    """One forward and backward over ``units`` (gradients add into ``.grad``); their losses."""
    segment = isinstance(loss, SegmentLoss)
    parts = [u.part for u in units]
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + (len(p) if segment else _leading(p)))
    rank_mask = torch.stack([u.mask for u in units]).to(device)
    slots = torch.tensor([u.slot for u in units])
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=dropout):
        if dropout:
            torch.manual_seed(units[0].seed)
        route_segments(model, torch.tensor(offsets), slots, rank_mask)
        if segment:
            segs = loss.segment_losses(model, _to(loss.cat(parts), device), offsets)
        else:
            segs = [loss(model, _to(parts[0], device))]
        segs = [_check_loss(s, first) for s in segs]
        total = units[0].weight * segs[0]
        for u, s in zip(units[1:], segs[1:], strict=True):
            total = total + u.weight * s
        total.backward()
    return [float(s.detach()) for s in segs]


def train_slots(
    model: nn.Module,
    side: Client,
    jobs: Sequence[Job],
    loss: SegmentLoss | LossFn,
    *,
    lr: float,
    weight_decay: float = 0.0,
    round_idx: int = 0,
    on_step: Callable[[int, int], None] | None = None,
    lr_scheduler: str = "constant",
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    max_grad_norm: float | None = None,
    grad_accum: int = 1,
    lora_dropout: float = 0.0,
    max_tokens_per_pass: int | None = None,
    gradient_checkpointing: bool = False,
) -> list[LocalResult]:
    """Train ``jobs`` together, job ``i`` in adapter slot ``i`` of ``model``; their uploads.

    The method's client side ``side`` prepares each slot from its download, runs its scoring
    steps, chooses what trains and builds the upload. Each step splits the active clients'
    batches into segments (a client training under several rank truncations at once, PreLort,
    contributes one copy per truncation, weighted equally; ``grad_accum`` micro-batches per
    batch), packs them into passes of at most ``max_tokens_per_pass`` tokens, runs one
    forward/backward per pass with each segment routed to its slot, and takes one masked AdamW
    step (:class:`fedlora.optim.SlotAdamW`) on the slots that train, after the gradients of every
    pass have added up (and each slot's own was clipped). The loss of a pass is the sum of its
    segments' weighted mean losses, so each client's gradient is its own. A :class:`SegmentLoss`
    can join segments in one forward; a plain ``loss(model, batch)`` callable runs one forward
    per segment. With the automatic budget on CPU every segment is its own pass, through the
    same operations the sequential engine runs, so the numbers do not depend on how many
    clients share the loop (bitwise). The knobs are :class:`TrainOptions`'. ``on_step(done,
    total)`` is called after every step (a progress bar). Each result's ``step_losses`` holds
    the client's training loss per step."""
    from fedlora.optim import SlotAdamW

    knobs = TrainOptions(
        lr_scheduler, warmup_steps, warmup_ratio, max_grad_norm, grad_accum, lora_dropout,
        max_tokens_per_pass, gradient_checkpointing,
    ).check()  # fmt: skip
    device = next(model.parameters()).device
    segment = isinstance(loss, SegmentLoss)
    side.start_round(model, round_idx)
    for slot, job in enumerate(jobs):
        side.prepare(model, slot, job.download, job.budget, job.seed)
    opt = SlotAdamW(model, lr=lr, weight_decay=weight_decay)
    pre = [side.pre_steps(j.budget) for j in jobs]
    for slot, job in enumerate(jobs):
        if pre[slot] == 0:  # nothing to score first: choose what trains now
            side.scoring_done(model, slot, job.budget, job.seed)
    total = [p + j.budget.steps for p, j in zip(pre, jobs, strict=True)]
    for slot, job in enumerate(jobs):
        if len(job.batches) < total[slot]:
            raise ValueError(
                f"batches: client {job.client} needs {total[slot]} batches ({pre[slot]} scoring "
                f"+ {job.budget.steps} training), got {len(job.batches)}"
            )
    lrs = [lr_factors(knobs, j.budget.steps, lr) for j in jobs]
    budget = knobs.max_tokens_per_pass
    if budget is None:
        budget = auto_tokens_per_pass(model, knobs.gradient_checkpointing)
    rank = side.options.rank
    ga = knobs.grad_accum
    history: list[list[float]] = [[] for _ in jobs]
    steps = max(total, default=0)
    with _training_knobs(model, knobs):
        for step in range(steps):
            active = [i for i in range(len(jobs)) if step < total[i]]
            units: list[_Unit] = []
            for i in active:
                part = jobs[i].batches[step]
                n = len(part) if segment else _leading(part)
                if n % ga:
                    raise ValueError(
                        f"grad_accum {ga} does not divide client {jobs[i].client}'s batch of "
                        f"{n} examples (step {step})"
                    )
                truncs = side.truncations(jobs[i].budget)
                copies = truncs if truncs is not None else [None]
                for c, t in enumerate(copies):
                    mask = _rank_mask(model, i, rank, t)
                    for k in range(ga):
                        piece = part if ga == 1 else _slice(part, k * n // ga, (k + 1) * n // ga)
                        seed = key(jobs[i].seed, step, c, k, DROPOUT_TAG)
                        units.append(_Unit(i, piece, 1.0 / len(copies) / ga, mask, seed))
            opt.zero_grad()
            per_client: dict[int, float] = {}
            for group in _passes(units, budget, segment):
                values = _run_pass(model, loss, group, device, step == 0, knobs.lora_dropout > 0)
                for u, v in zip(group, values, strict=True):
                    per_client[u.slot] = per_client.get(u.slot, 0.0) + u.weight * v
            side.after_backward(model, active)
            train_now = torch.zeros(opt.num_slots, dtype=torch.bool)
            slot_lr = [float(lr)] * opt.num_slots
            for i in active:
                if step >= pre[i]:
                    train_now[i] = True
                    slot_lr[i] = lrs[i][step - pre[i]]
                    history[i].append(per_client[i])
            if knobs.max_grad_norm is not None:
                opt.clip_grad_norm_(knobs.max_grad_norm, train_now)
            opt.step(train_now, lr=slot_lr)
            for i in active:
                if step + 1 == pre[i]:
                    side.scoring_done(model, i, jobs[i].budget, jobs[i].seed)
            if on_step is not None:
                on_step(step + 1, steps)
    route_segments(model, None)
    results = []
    for slot, job in enumerate(jobs):
        state, meta = side.upload(model, slot, job.budget)
        h = history[slot]
        metrics = {
            "train_loss": h[-1] if h else float("nan"),
            "train_loss_mean": sum(h) / len(h) if h else float("nan"),
            "steps": float(len(h)),
        }
        results.append(
            LocalResult(dict(state), dict(meta), int(job.num_examples), metrics, list(h))
        )
    return results


# ------------------------------------------------------------------------------------- checks
def check_budget(method: Method, options: ClientOptions, budget: Any) -> Budget:
    """``budget`` if the method can honour it under ``options``; ValueError naming it otherwise."""
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a fedlora.methods.Budget, got {type(budget).__name__}")
    for name in ("rank", "heads", "components", "steps"):
        value = getattr(budget, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"budget.{name} must be a positive int, got {value!r}")
    limits = {"rank": options.rank, "components": options.rank, "heads": options.heads}
    for name, limit in limits.items():
        if name in method.budget_fields and getattr(budget, name) > limit:
            raise ValueError(
                f"budget.{name} = {getattr(budget, name)} exceeds the run's {limit} "
                f"({'global rank' if name != 'heads' else 'heads'}): method {method.name!r} "
                "cannot honour it"
            )
    if method.ranks == "equal" and "rank" in method.budget_fields and budget.rank != options.rank:
        raise ValueError(
            f"budget.rank = {budget.rank}: method {method.name!r} trains the global rank "
            f"{options.rank} on every client"
        )
    return budget


def check_download(model: nn.Module, method: Method, download: Any) -> None:
    """``download`` matches ``model``'s adapters (keys, and shapes up to the rank a rank policy
    allows); ValueError/TypeError naming ``download`` otherwise. Reads, never writes."""
    from fedlora.state_dict import get_adapter_state_dict

    if not isinstance(download, Mapping):
        raise TypeError(f"download must be a dict of tensors, got {type(download).__name__}")
    bad = [k for k, v in download.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"download[{bad[0]!r}] must be a tensor, got {type(download[bad[0]])}")
    want = {k: tuple(v.shape) for k, v in get_adapter_state_dict(model, slot=0).items()}
    if not want:
        raise ValueError("model has no adapter layers: fedlora.inject(model, method, ...) first")
    have = {k: tuple(v.shape) for k, v in download.items() if not k.endswith(keys.SERVER_SUFFIXES)}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        what = f"lacks {missing[:3]}" if missing else f"has keys the model does not use {extra[:3]}"
        raise ValueError(f"download does not match the model's adapters: it {what}")
    for k, shape in have.items():
        w = want[k]
        if shape == w:
            continue
        rank_dim = 0 if k.endswith(keys.A_SUFFIX) else 1 if k.endswith(keys.B_SUFFIX) else None
        ok = (
            method.ranks != "equal"
            and rank_dim is not None
            and len(shape) == len(w)
            and all(s == t for d, (s, t) in enumerate(zip(shape, w, strict=True)) if d != rank_dim)
            and 1 <= shape[rank_dim] <= w[rank_dim]
        )
        if not ok:
            raise ValueError(f"download[{k!r}] has shape {list(shape)}, the model's is {list(w)}")
        if not bool(torch.isfinite(download[k]).all()):
            raise ValueError(f"download[{k!r}] holds NaN or inf")


# ------------------------------------------------------------------------------------- one client
class _Batches(Sequence):
    """The first ``n`` batches of a user iterable, drawn lazily: a re-iterable source (a list, a
    DataLoader) is cycled when it runs out, a one-shot iterator must hold enough."""

    def __init__(self, source: Iterable[Any], n: int) -> None:
        self.source, self.n = source, n
        self.items: list[Any] = []
        self.it: Iterator[Any] = iter(source)
        self.one_shot = self.it is source
        first = next(self.it, _END)
        if first is _END:
            raise ValueError("batches yielded nothing: a client needs at least one batch")
        self.items.append(first)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        while len(self.items) <= i:
            item = next(self.it, _END)
            if item is _END:
                if self.one_shot:
                    raise ValueError(
                        f"batches: the iterator ran out after {len(self.items)} batches, "
                        f"{self.n} are needed (give a list or a DataLoader to cycle)"
                    )
                self.it = iter(self.source)
                continue
            self.items.append(item)
        return self.items[i]


_END = object()


class LocalClient:
    """One client's local side for one model, across rounds (see the module docstring).

    Args:
        method: a registered method name or :class:`fedlora.methods.Method`.
        model: a model with the method's adapters injected (``fedlora.inject``; a slotted model
            built for the simulator works too, its slot 0 is used).
        loss: ``loss(model, batch) -> scalar tensor`` or a :class:`SegmentLoss` (a simulator
            task).
        lr, weight_decay: the local AdamW's settings.
        lr_scheduler, warmup_steps, warmup_ratio, max_grad_norm, grad_accum, lora_dropout,
        max_tokens_per_pass, gradient_checkpointing: the loop's knobs (:class:`TrainOptions`);
            :meth:`train` may override any of them for one round.
        options: the run-wide :class:`fedlora.methods.ClientOptions` (global rank, heads, ...);
            default: read from the model's adapters.
        side: the method's client-side object to use (the simulator shares its own); default:
            ``method.client(options, [])``, set up on ``model`` once.
    """

    def __init__(
        self,
        method: str | Method,
        model: nn.Module,
        *,
        loss: SegmentLoss | LossFn,
        lr: float,
        weight_decay: float = 0.0,
        options: ClientOptions | None = None,
        side: Client | None = None,
        **knobs: Any,
    ) -> None:
        self.method = get_method(method) if isinstance(method, str) else method
        if not isinstance(self.method, Method):
            raise TypeError(f"method must be a name or a Method, got {type(method).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(loss, SegmentLoss) or callable(loss)):
            raise TypeError(f"loss must be callable or a SegmentLoss, got {type(loss).__name__}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if options is not None and not isinstance(options, ClientOptions):
            raise TypeError(f"options must be a ClientOptions, got {type(options).__name__}")
        self.model, self.loss = model, loss
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.knobs = _knobs(TrainOptions(), knobs)
        self.options = options or _options_of_model(model)
        if side is None:
            side = self.method.client(self.options, [])
            side.setup(model)
        self.side = side

    def train(
        self,
        download: Mapping[str, torch.Tensor],
        budget: Budget,
        batches: Iterable[Any],
        *,
        seed: int,
        round_idx: int = 0,
        client: int = 0,
        num_examples: int | None = None,
        handback: Mapping[str, Any] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        dp_clip: float | None = None,
        **knobs: Any,
    ) -> LocalResult:
        """Train on ``batches`` from ``download`` under ``budget``; the upload.

        ``seed``: :func:`client_seed` of (run seed, round, client). ``handback``: what the
        server's :class:`fedlora.rounds.Server` hands back with the download (HAFL truncation's
        averaged scores, which say where the downloaded components belong). ``num_examples``:
        the client's weight (default: the examples in the batches used). The download's base
        merges (FLoRA, FedEx-LoRA) are folded into the model's frozen base first. Everything is
        checked before the model is touched. ``dp_clip``: client-level DP's clip norm ``C``:
        the upload is :func:`fedlora.privacy.clip_update`'d (its pre-clip norm in
        ``metrics["update_norm"]``). ``knobs``: :class:`TrainOptions` fields that override the
        client's for this call."""
        from fedlora.state_dict import apply_base_merges

        settings = _knobs(self.knobs, knobs)

        budget = check_budget(self.method, self.options, budget)
        check_download(self.model, self.method, download)
        if handback is not None and not isinstance(handback, Mapping):
            raise TypeError(f"handback must be a dict, got {type(handback).__name__}")
        if num_examples is not None and (
            isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0
        ):
            raise ValueError(f"num_examples must be a non-negative int, got {num_examples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        need = self.side.pre_steps(budget) + budget.steps
        taken = _Batches(batches, need)
        if handback:
            self.side.after_aggregate(handback)
        state = apply_base_merges(self.model, dict(download))
        job = Job(client, budget, state, taken, seed, 0)
        result = train_slots(
            self.model,
            self.side,
            [job],
            self.loss,
            lr=self.lr,
            weight_decay=self.weight_decay,
            round_idx=round_idx,
            on_step=on_step,
            **dataclasses.asdict(settings),
        )[0]
        if num_examples is None:
            num_examples = sum(
                len(b) if isinstance(self.loss, SegmentLoss) else _leading(b)
                for b in taken.items[self.side.pre_steps(budget) :]
            )
        result.num_examples = int(num_examples)
        if dp_clip is not None:  # --- differential privacy: clip the upload's delta jointly
            from fedlora.privacy import clip_update

            result.state, result.meta, norm = clip_update(
                self.method.name, download, result.state, result.meta, dp_clip
            )
            result.metrics["update_norm"] = norm
        return result


def _knobs(base: TrainOptions, changes: Mapping[str, Any]) -> TrainOptions:
    """``base`` with ``changes`` (TypeError naming an unknown knob), checked."""
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(base, **changes).check()


def _options_of_model(model: nn.Module) -> ClientOptions:
    """The run's ClientOptions as far as the injected adapters tell them (rank, alpha, heads)."""
    from fedlora.layers.lora import LoRALinear
    from fedlora.layers.ravan import RavanLinear

    for module in model.modules():
        if isinstance(module, LoRALinear):
            return ClientOptions(rank=module.rank, alpha=float(module.alpha))
        if isinstance(module, RavanLinear):
            return ClientOptions(rank=module.rank, heads=module.heads)
    raise ValueError("model has no adapter layers: fedlora.inject(model, method, ...) first")
