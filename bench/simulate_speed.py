"""Batched vs sequential engine of ``fedlora simulate``: rounds per second on the same experiment.

    python bench/simulate_speed.py --clients 16 --rounds 2          # CPU (embedded MiniLM)
    python bench/simulate_speed.py --clients 32 --device cuda       # GPU

Both engines run the same config (same partition, same batches); the script checks that they
reach the same test loss, then writes ``bench/results/simulate-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import environment, results_path, write_results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/simulate_speed.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", default="fedit")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from fedlora.simulate import SimConfig, run

    args = parse_args(argv)
    if args.device != "cpu":
        torch.set_default_device(args.device)
    rows = {}
    for engine in ("sequential", "batched"):
        cfg = SimConfig(
            method=args.method,
            clients=args.clients,
            rounds=args.rounds,
            local_steps=args.local_steps,
            batch_size=args.batch_size,
            engine=engine,
            max_test=64,
        )
        t0 = time.perf_counter()
        result = run(cfg, None, progress=False, log=lambda s: None)
        seconds = time.perf_counter() - t0
        train_s = sum(r["seconds"] for r in result.rounds)
        rows[engine] = {
            "seconds_total": seconds,
            "seconds_rounds": train_s,
            "rounds_per_s": args.rounds / train_s,
            "final_test_loss": result.rounds[-1]["test_loss"],
        }
        print(engine, rows[engine], flush=True)
    speedup = rows["batched"]["rounds_per_s"] / rows["sequential"]["rounds_per_s"]
    same = abs(rows["batched"]["final_test_loss"] - rows["sequential"]["final_test_loss"]) < 1e-3
    out = environment(
        args.device,
        config=vars(args),
        engines=rows,
        batched_speedup=speedup,
        same_test_loss=same,
    )
    suffix = f"-c{args.clients}-b{args.batch_size}"
    path = write_results(out, results_path(out["device"], prefix="simulate-", suffix=suffix))
    print(
        f"batched / sequential rounds per second: {speedup:.2f}x (same test loss: {same}); wrote {path}"
    )


if __name__ == "__main__":
    main()
