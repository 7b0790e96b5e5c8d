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
    "client_seed",
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
    (``None``: everything to slot 0, no truncation). ``rank_mask`` ``[S, R]`` truncates LoRA
    segments (PreLort's nested ranks); other layers ignore it."""
    from fedlora.layers.lora import LoRALinear
    from fedlora.state_dict import slotted_modules

    for _, module in slotted_modules(model):
        if offsets is None:
            module.set_segments(None)
        elif isinstance(module, LoRALinear):
            module.set_segments(offsets, slots, rank_mask)
        else:
            module.set_segments(offsets, slots)


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
    of the last training step; ``train_loss_mean``: over all training steps; ``steps``)."""

    state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


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
) -> list[LocalResult]:
    """Train ``jobs`` together, job ``i`` in adapter slot ``i`` of ``model``; their uploads.

    The method's client side ``side`` prepares each slot from its download, runs its scoring
    steps, chooses what trains and builds the upload. Each step joins the active clients'
    batches (a client training under several rank truncations at once, PreLort, contributes one
    copy per truncation, weighted equally), routes each segment to its slot, and takes one masked
    AdamW step (:class:`fedlora.optim.SlotAdamW`) on the slots that train. The total
    loss is the sum of per-client mean losses, so each client's gradient is its own. A
    :class:`SegmentLoss` computes every segment in one forward; a plain ``loss(model, batch)``
    callable runs one forward per segment (same gradients, more passes). ``on_step(done,
    total)`` is called after every step (a progress bar)."""
    from fedlora.optim import SlotAdamW

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
    rank = side.options.rank
    last = [float("nan")] * len(jobs)
    sums, counts = [0.0] * len(jobs), [0] * len(jobs)
    steps = max(total, default=0)
    for step in range(steps):
        active = [i for i in range(len(jobs)) if step < total[i]]
        parts, offsets, slots, weights, masks = [], [0], [], [], []
        for i in active:
            part = jobs[i].batches[step]
            truncs = side.truncations(jobs[i].budget)
            copies = truncs if truncs is not None else [None]
            for t in copies:
                parts.append(part)
                offsets.append(offsets[-1] + (len(part) if segment else _leading(part)))
                slots.append(i)
                weights.append(1.0 / len(copies))
                masks.append(_rank_mask(model, i, rank, t))
        rank_mask = torch.stack(masks).to(device)
        if segment:
            route_segments(model, torch.tensor(offsets), torch.tensor(slots), rank_mask)
            seg_losses = loss.segment_losses(model, _to(loss.cat(parts), device), offsets)
            seg_losses = [_check_loss(s, step == 0) for s in seg_losses]
        else:
            seg_losses = []
            for t, part in enumerate(parts):
                n = offsets[t + 1] - offsets[t]
                route_segments(
                    model, torch.tensor([0, n]), torch.tensor([slots[t]]), rank_mask[t : t + 1]
                )
                seg_losses.append(_check_loss(loss(model, _to(part, device)), step == 0))
        total_loss = seg_losses[0].new_zeros(())
        per_client: dict[int, float] = {}
        for s, seg in enumerate(seg_losses):
            total_loss = total_loss + weights[s] * seg
            per_client[slots[s]] = per_client.get(slots[s], 0.0) + weights[s] * float(seg.detach())
        opt.zero_grad()
        total_loss.backward()
        side.after_backward(model, active)
        train_now = torch.zeros(opt.num_slots, dtype=torch.bool)
        for i in active:
            if step >= pre[i]:
                train_now[i] = True
                last[i] = per_client[i]
                sums[i] += per_client[i]
                counts[i] += 1
        opt.step(train_now)
        for i in active:
            if step + 1 == pre[i]:
                side.scoring_done(model, i, jobs[i].budget, jobs[i].seed)
        if on_step is not None:
            on_step(step + 1, steps)
    route_segments(model, None)
    results = []
    for slot, job in enumerate(jobs):
        state, meta = side.upload(model, slot, job.budget)
        metrics = {
            "train_loss": last[slot],
            "train_loss_mean": sums[slot] / counts[slot] if counts[slot] else float("nan"),
            "steps": float(counts[slot]),
        }
        results.append(LocalResult(dict(state), dict(meta), int(job.num_examples), metrics))
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
    ) -> LocalResult:
        """Train on ``batches`` from ``download`` under ``budget``; the upload.

        ``seed``: :func:`client_seed` of (run seed, round, client). ``handback``: what the
        server's :class:`fedlora.rounds.Server` hands back with the download (HAFL truncation's
        averaged scores, which say where the downloaded components belong). ``num_examples``:
        the client's weight (default: the examples in the batches used). The download's base
        merges (FLoRA, FedEx-LoRA) are folded into the model's frozen base first. Everything is
        checked before the model is touched. ``dp_clip``: client-level DP's clip norm ``C``:
        the upload is :func:`fedlora.privacy.clip_update`'d (its pre-clip norm in
        ``metrics["update_norm"]``)."""
        from fedlora.state_dict import apply_base_merges

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
