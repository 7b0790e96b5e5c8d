"""SFT training-step throughput: fedlora's LoRA step beside PEFT's on the same model and batch.

    python bench/sft_throughput.py                                  # CPU: the embedded SmolLM2
    python bench/sft_throughput.py --threads 1                      # CPU shared with other jobs
    python bench/sft_throughput.py --random --device cuda           # GPU: SmolLM2's shape, random
    python bench/sft_throughput.py --tiny --steps 2 --out /tmp/t.json   # a smoke run of the script

One batch, one model architecture, several ways to take one training step on it (LoRA rank 8,
alpha 16, on ``q_proj`` and ``v_proj``), timed interleaved step by step so a shared machine's
noise hits every row alike:

- ``ours``: ``fedlora.inject(model, "fedit", ...)``; the loss of ``fedlora simulate --task
  sft`` (``SFTTask.segment_losses`` over one client segment, i.e.
  ``response_token_losses``: the LM head only at the positions that predict a response token),
  backward, one ``SlotAdamW`` step; the batch is routed with one ``SegmentPlan`` for every
  layer (``fedlora.layers.route``), planned once per step;
- ``peft``: ``peft.get_peft_model(model, LoraConfig(r=8, lora_alpha=16, ...))`` with the usual
  Hugging Face loss ``model(input_ids, attention_mask, labels=labels).loss`` (logits at every
  position), backward, ``torch.optim.AdamW`` on the LoRA parameters;
- ``peft_head_only``: the same PEFT model with our head-only loss (separates the loss from the
  adapter layers in the comparison);
- ``frozen_floor``: no adapters, the head-only loss, backward to the input embeddings: the frozen
  model's forward and backward, what any adapter adds to.

The batch is ``--batch`` examples (half from ``arithmetic``, half from ``stdlib_qa``: real prompts
through the chat template, response-only labels) encoded by ``SFTTask().encode`` at
``--max-length`` (default 8 x 128; padded, not trimmed, so every row computes the same positions;
the real and response token counts are reported). Reported per row: median step seconds (the
``--warmup`` first steps excluded), tokens/s over the padded positions, the real (unpadded)
tokens and the response tokens, peak CUDA memory, and the first step's loss (with B = 0 every row
computes the same base-model loss: a check that they train the same objective). Results go to
``bench/results/sft-throughput-<device>.json`` (or ``--out``), rewritten after every round of
steps with ``"complete": false`` until the last: a run cut short by its time limit (SIGINT from
``bench/gpu_all.sh``) keeps every step measured before the cut.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "python_api"))

from _timing import device_name, environment, results_path, write_results  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
RANK, ALPHA, LR = 8, 16.0, 1e-3
DATA = ("arithmetic", "stdlib_qa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/sft_throughput.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model", default="smollm2", help="smollm2 (the embedded model) or a causal-LM folder"
    )
    src.add_argument(
        "--random", action="store_true", help="SmolLM2-135M's architecture, random weights"
    )
    src.add_argument("--tiny", action="store_true", help="a 2-layer random LM (smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--warmup", type=int, default=None, help="default: 2 on CPU, 5 on a GPU")
    p.add_argument("--steps", type=int, default=None, help="default: 5 on CPU, 20 on a GPU")
    p.add_argument(
        "--rows",
        default="ours,peft,peft_head_only,frozen_floor",
        help="comma-separated rows to time (ours and peft at least for the ratio)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); on a CPU shared with other jobs, 1 thread "
        "avoids the spinning of threads that wait for a descheduled sibling",
    )
    p.add_argument("--note", action="append", default=[], help="a note for the results file")
    p.add_argument("--out", type=Path, default=None, help="results file (default: bench/results)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------- inputs
def model_source(args: argparse.Namespace, tmp: str) -> tuple[str, str]:
    """``(what load_causal_lm loads, a label)``: the embedded model, a folder, or a random LM
    written to ``tmp`` (its word-level vocabulary covers both instruction sets)."""
    if not (args.random or args.tiny):
        return args.model, args.model
    from fedlora.data import load_instructions
    from fedlora.testing import random_causal_lm

    texts = [
        f"{ex['instruction']} {ex['input']} {ex['output']}"
        for name in DATA
        for ex in load_instructions(name, seed=0).examples
    ]
    size = "tiny" if args.tiny else "smollm2"
    t0 = time.perf_counter()
    folder = random_causal_lm(Path(tmp) / f"random-{size}", size=size, texts=texts)
    print(f"random {size} LM written in {time.perf_counter() - t0:.1f}s", flush=True)
    return str(folder), f"random:{size}"


def make_batch(tokenizer: Any, batch: int, max_length: int) -> Any:
    """``batch`` training examples, alternately from the two instruction sets' train splits,
    encoded as ``fedlora simulate --task sft`` encodes them (padded to ``max_length``)."""
    from fedlora.data import load_instructions
    from fedlora.simulate import SimConfig
    from fedlora.simulate.tasks.sft import LMBatch, SFTTask

    cfg = SimConfig(task="sft", max_length=max_length)
    task = SFTTask()
    per = [batch // len(DATA) + (i < batch % len(DATA)) for i in range(len(DATA))]
    parts = [
        task.encode(tokenizer, load_instructions(name, seed=0).train.subset(range(k)), cfg)
        for name, k in zip(DATA, per, strict=True)
        if k
    ]
    return LMBatch.cat(parts)


def load(source: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    from fedlora.models import load_causal_lm

    lm, tok = load_causal_lm(source, dtype=dtype)
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm.to(device), tok


# ------------------------------------------------------------------------------------- rows
def head_only_loss(lm: Any, batch: Any) -> torch.Tensor:
    """The simulator's SFT loss over one segment: mean NLL of the response tokens, the LM head
    applied only where the next token is a response token."""
    from fedlora.simulate.tasks.sft import SFTTask

    return SFTTask().segment_losses(lm, batch, [0, len(batch)])[0]


def ours_row(source: str, dtype: torch.dtype, device: torch.device, batch: Any):
    import fedlora
    from fedlora.layers import SegmentPlan, route
    from fedlora.simulate.devices import adapters_to_float32
    from fedlora.simulate.optim import SlotAdamW

    lm, _ = load(source, dtype, device)
    fedlora.inject(lm, "fedit", target_modules=TARGETS, rank=RANK, alpha=ALPHA)
    adapters_to_float32(lm)
    lm.to(device).eval()  # the simulator's mode (the model has no dropout)
    opt = SlotAdamW(lm, lr=LR)
    rank_mask = torch.ones(1, RANK, dtype=torch.bool, device=device)
    active = torch.ones(1, dtype=torch.bool)

    def step() -> float:
        # as the engine routes one client: one plan per batch, shared by every layer
        route(lm, SegmentPlan([0, len(batch)], [0], rank_mask, device=device))
        loss = head_only_loss(lm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step(active)
        return float(loss.detach())

    return lm, step, sum(p.numel() for p, *_ in opt.entries)


def peft_model(source: str, dtype: torch.dtype, device: torch.device):
    from peft import LoraConfig, get_peft_model

    lm, _ = load(source, dtype, device)
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(lm, config).to(device)
    model.train()  # as a Trainer would run it (no dropout here: same arithmetic as eval)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=LR), sum(p.numel() for p in params)


def peft_row(model: Any, opt: Any, batch: Any):
    def step() -> float:
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())

    return step


def peft_head_only_row(model: Any, opt: Any, batch: Any):
    lm = model.get_base_model()  # the LlamaForCausalLM holding PEFT's LoRA layers

    def step() -> float:
        loss = head_only_loss(lm, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def floor_row(source: str, dtype: torch.dtype, device: torch.device, batch: Any):
    lm, _ = load(source, dtype, device)
    lm.eval()
    decoder, head, embed = lm.get_decoder(), lm.get_output_embeddings(), lm.get_input_embeddings()
    target = batch.labels[:, 1:]
    sel = target != -100

    def step() -> float:
        x = embed(batch.input_ids).detach().requires_grad_()
        hidden = decoder(inputs_embeds=x, attention_mask=batch.attention_mask, use_cache=False)
        logits = head(hidden.last_hidden_state[:, :-1][sel])
        loss = F.cross_entropy(logits.float(), target[sel])
        loss.backward()
        return float(loss.detach())

    return lm, step


# ------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(
    steps: dict,
    device: torch.device,
    warmup: int,
    n: int,
    on_round: Any = None,
    out: dict[str, dict] | None = None,
    loads: list[float] | None = None,
) -> tuple[dict[str, dict], list[float]]:
    """Every row's step, interleaved, ``warmup + n`` times: per row the seconds, losses and peak
    memory; and the 1-minute load average after each round of steps (a shared CPU's noise).
    ``on_round()`` runs after every round (the caller saves the partial rows: a run cut short
    by its time limit keeps every step measured); ``out`` / ``loads`` are filled in place."""
    if out is None:
        out = {}
    out.update({name: {"seconds": [], "losses": [], "peak_mib": None} for name in steps})
    loads = [] if loads is None else loads
    for i in range(warmup + n):
        this: dict[str, float] = {}
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            sync(device)
            t0 = time.perf_counter()
            loss = step()
            sync(device)
            dt = this[name] = time.perf_counter() - t0
            row = out[name]
            row["losses"].append(loss)
            if i >= warmup:
                row["seconds"].append(dt)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                row["peak_mib"] = max(row["peak_mib"] or 0.0, peak)
        loads.append(os.getloadavg()[0])
        print(
            f"step {i + 1}/{warmup + n}{' (warm-up)' if i < warmup else ''}: "
            + "  ".join(f"{k} {v:.3f}s" for k, v in this.items()),
            flush=True,
        )
        if on_round is not None:
            on_round()
    return out, loads


def summarise(
    timed: dict[str, dict],
    loads: list[float],
    *,
    complete: bool,
    args: argparse.Namespace,
    batch: Any,
    dtype: torch.dtype,
    device: torch.device,
    label: str,
    cuda: bool,
    load_before: tuple,
    trainable: dict,
    warmup: int,
    n: int,
) -> tuple[dict, dict, dict, bool]:
    """``(results, rows, ratios, same_first_loss)`` of the steps timed so far (rows with at
    least one timed step; ``complete`` False marks a partial save)."""
    timed = {k: t for k, t in timed.items() if t["seconds"]}
    load_after = os.getloadavg()

    positions = batch.input_ids.numel()
    real = int(batch.attention_mask.sum())
    response = int((batch.labels != -100).sum())
    predicted = int((batch.labels[:, 1:] != -100).sum())
    rows = {}
    for name, t in timed.items():
        med = statistics.median(t["seconds"])
        rows[name] = {
            "median_step_s": med,
            "min_step_s": min(t["seconds"]),
            "step_s": t["seconds"],
            "positions_per_s": positions / med,
            "tokens_per_s": real / med,
            "response_tokens_per_s": response / med,
            "first_loss": t["losses"][0],
            "last_loss": t["losses"][-1],
            "peak_mib": t["peak_mib"],
        }
    ratios = {}
    if "ours" in rows:
        for other in ("peft", "peft_head_only", "frozen_floor"):
            if other in rows:
                a, b = timed["ours"]["seconds"], timed[other]["seconds"]
                ratios[f"ours_over_{other}"] = {
                    "median_step_s": rows["ours"]["median_step_s"] / rows[other]["median_step_s"],
                    "min_step_s": min(a) / min(b),
                    # the steps are interleaved: step i of both rows ran side by side
                    "paired_median": statistics.median(x / y for x, y in zip(a, b, strict=False)),
                }
    # rows whose first step is their model's first update (peft_head_only shares PEFT's model)
    fresh = [k for k in rows if k != "peft_head_only" or "peft" not in rows]
    first = [rows[k]["first_loss"] for k in fresh]
    same_objective = max(first) - min(first) <= (2e-3 if dtype == torch.float32 else 5e-2) * max(
        1.0, abs(first[0])
    )
    notes = list(args.note)
    if not cuda and max(load_before[0], load_after[0]) > torch.get_num_threads():
        notes.append(
            f"shared CPU: 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} "
            f"after on {os.cpu_count()} cores; timings are noisy, medians reported"
        )
    results = environment(
        str(device),
        model=label,
        dtype=str(dtype).removeprefix("torch."),
        lora={"rank": RANK, "alpha": ALPHA, "target_modules": TARGETS},
        batch={
            "rows": len(batch),
            "max_length": args.max_length,
            "positions": positions,
            "real_tokens": real,
            "response_tokens": response,
            "head_positions_ours": predicted,
            "data": list(DATA),
            "real_tokens_per_row": batch.attention_mask.sum(1).tolist(),
        },
        trainable_params=trainable,
        warmup_steps=warmup,
        timed_steps=n,
        rows=rows,
        ratios=ratios,
        same_first_loss=same_objective,
        loadavg={"before": list(load_before), "after": list(load_after), "per_step": loads},
        notes=notes,
        complete=complete,
    )
    try:
        import peft
        import transformers

        results["peft"], results["transformers"] = peft.__version__, transformers.__version__
    except ImportError:
        pass
    return results, rows, ratios, same_objective


def main(argv: list[str] | None = None) -> int:
    from fedlora.simulate.devices import resolve_device, resolve_dtype

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    n = args.steps if args.steps is not None else (20 if cuda else 5)
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    known = ("ours", "peft", "peft_head_only", "frozen_floor")
    if not names or set(names) - set(known):
        raise SystemExit(f"--rows: choose from {', '.join(known)}; got {args.rows!r}")
    torch.manual_seed(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sft-throughput-") as tmp:
        source, label = model_source(args, tmp)
        t0 = time.perf_counter()
        _, tokenizer = load(source, dtype, torch.device("cpu"))
        batch = make_batch(tokenizer, args.batch, args.max_length)
        batch_dev = batch.to(device)
        steps: dict[str, Any] = {}
        trainable: dict[str, int] = {}
        keep = []  # the models stay alive while their steps are timed
        if "ours" in names:
            m, steps["ours"], trainable["ours"] = ours_row(source, dtype, device, batch_dev)
            keep.append(m)
        if "peft" in names or "peft_head_only" in names:
            m, opt, trainable["peft"] = peft_model(source, dtype, device)
            keep.append(m)
            if "peft" in names:
                steps["peft"] = peft_row(m, opt, batch_dev)
            if "peft_head_only" in names:
                steps["peft_head_only"] = peft_head_only_row(m, opt, batch_dev)
        if "frozen_floor" in names:
            m, steps["frozen_floor"] = floor_row(source, dtype, device, batch_dev)
            keep.append(m)
        print(f"models loaded in {time.perf_counter() - t0:.1f}s ({label}, {dtype})", flush=True)
        steps = {k: steps[k] for k in names}
        path = args.out or results_path(device_name(str(device)), prefix="sft-throughput-")
        timed: dict[str, dict] = {}
        loads: list[float] = []
        meta = dict(args=args, batch=batch, dtype=dtype, device=device, label=label, cuda=cuda,
                    load_before=load_before, trainable=trainable, warmup=warmup, n=n)  # fmt: skip

        def save_partial() -> None:
            if any(t["seconds"] for t in timed.values()):
                write_results(summarise(timed, loads, complete=False, **meta)[0], path)

        try:
            time_rows(steps, device, warmup, n, save_partial, timed, loads)
        except KeyboardInterrupt:  # gpu_all.sh's time limit: keep the steps measured so far
            print("interrupted: writing the steps measured so far", file=sys.stderr, flush=True)
            save_partial()
            return 1
    results, rows, ratios, same_objective = summarise(timed, loads, complete=True, **meta)
    write_results(results, path)
    b = results["batch"]
    print(
        f"batch {len(batch)}x{args.max_length}: {b['real_tokens']} real tokens, "
        f"{b['response_tokens']} response tokens"
    )
    for name, r in rows.items():
        print(
            f"{name:15s} median {r['median_step_s']:.4f}s (min {r['min_step_s']:.4f}s)  "
            f"{r['positions_per_s']:.0f} pos/s  "
            f"{r['tokens_per_s']:.0f} tok/s  {r['response_tokens_per_s']:.0f} resp tok/s  "
            f"first loss {r['first_loss']:.4f}"
            + (f"  peak {r['peak_mib']:.0f} MiB" if r["peak_mib"] is not None else "")
        )
    for k, v in ratios.items():
        print(f"{k}: " + "  ".join(f"{m} {x:.3f}" for m, x in v.items()))
    print(f"same first loss in every row: {same_objective}; wrote {path}")
    return 0 if same_objective else 1


if __name__ == "__main__":
    sys.exit(main())
