"""The SFT learning-rate tuning run behind the methods' per-task default rates (issue 21 item 3).

Runs ``fedlora simulate --task sft`` for one method at several learning rates (and FedIT at its
default as the reference), one run at a time, each in its own process, timing each, and writes
``bench/results/lr-tuning-sft.json`` and ``.md``: the test perplexity before training and after
the last round, its improvement, and the wall time of every run.

    python bench/claims_lr_tuning.py                    # ravan at 1e-3,3e-3,1e-2,3e-2 vs fedit
    python bench/claims_lr_tuning.py --method ravan --lrs 1e-2,3e-2 --out /tmp/tune

The settings are deliberately small (4 clients, 2 rounds, 4 local steps, 64 tokens) so the whole
sweep fits a few minutes of a 2-core CPU; the chosen rate is then checked on the README's SFT
command (8 clients, 3 rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SMALL = ["--task", "sft", "--clients", "4", "--rounds", "2", "--local-steps", "4",
         "--max-length", "64", "--no-progress"]  # fmt: skip


def one(method: str, lr: float | None, out: Path, extra: list[str]) -> dict:
    """One ``fedlora simulate`` run in its own process; its final metrics and wall time."""
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--method", method, *SMALL, *extra]
    if lr is not None:
        cmd += ["--lr", f"{lr:g}"]
    tag = f"{method}-lr{lr:g}" if lr is not None else f"{method}-default"
    cmd += ["--out", str(out / tag)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    row: dict = {"method": method, "lr": lr, "command": " ".join(cmd[2:]), "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return row
    metrics = json.loads((out / tag / "metrics.json").read_text())
    initial, last = metrics.get("initial") or {}, metrics["rounds"][-1]
    row["config_lr"] = metrics["config"]["lr"]
    for key in ("test_perplexity", "test_loss", "rouge_l", "exact_match"):
        row[f"initial_{key}"] = initial.get(key)
        row[f"final_{key}"] = last.get(key)
    if row["initial_test_perplexity"] and row["final_test_perplexity"]:
        row["perplexity_drop"] = row["initial_test_perplexity"] - row["final_test_perplexity"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="ravan")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2")
    p.add_argument("--reference", default="fedit", help="run once at its default rate")
    p.add_argument("--out", default="runs/lr-tuning-sft")
    p.add_argument("--results", default="bench/results/lr-tuning-sft")
    args, extra = p.parse_known_args(argv)
    out = Path(args.out)
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    rows = []
    for method, lr in [(args.reference, None)] + [(args.method, lr) for lr in lrs]:
        rows.append(one(method, lr, out, extra))
        print(json.dumps(rows[-1]), flush=True)
    data = {"settings": " ".join(SMALL + extra), "threads": os.environ.get("OMP_NUM_THREADS"),
            "runs": rows}  # fmt: skip
    Path(args.results + ".json").write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
