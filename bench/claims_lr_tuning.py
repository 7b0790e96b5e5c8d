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


def markdown(data: dict) -> str:
    """The tuning runs as a Markdown table (written beside the JSON)."""
    lines = [
        "# Learning-rate tuning on the SFT task (Ravan's default rate)",
        "",
        f"`fedlora simulate {data['settings']}` at each rate, one run at a time, each in its own "
        "process, on this project's 2-core CPU shared with other jobs (wall times are therefore "
        "upper bounds). Made by `python bench/claims_lr_tuning.py`; the numbers are in "
        "`lr-tuning-sft.json`.",
        "",
        "| method | lr | test perplexity before → after | drop | ROUGE-L after | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        if "error" in r:
            lines.append(
                f"| {r['method']} | {r['lr']} | failed: {r['error']} | | | {r['wall_s']} |"
            )
            continue
        lr = f"{r['config_lr']:g}" + (" (default)" if r["lr"] is None else "")
        lines.append(
            f"| {r['method']} | {lr} | {r['initial_test_perplexity']:.2f} → "
            f"{r['final_test_perplexity']:.2f} | {r.get('perplexity_drop', float('nan')):.2f} | "
            f"{r['final_rouge_l']:.3f} | {r['wall_s']:.0f} |"
        )
    notes = [f"- {n}" for n in data.get("notes", [])]
    return "\n".join([*lines, "", *notes]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="ravan")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2")
    p.add_argument("--reference", default="fedit", help="run once at its default rate")
    p.add_argument("--out", default="runs/lr-tuning-sft")
    p.add_argument("--results", default="bench/results/lr-tuning-sft")
    p.add_argument("--md-only", action="store_true", help="rewrite the .md from the .json")
    args, extra = p.parse_known_args(argv)
    if args.md_only:
        data = json.loads(Path(args.results + ".json").read_text())
        Path(args.results + ".md").write_text(markdown(data))
        return 0
    out = Path(args.out)
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    rows = []
    for method, lr in [(args.reference, None)] + [(args.method, lr) for lr in lrs]:
        rows.append(one(method, lr, out, extra))
        print(json.dumps(rows[-1]), flush=True)
    data = {"settings": " ".join(SMALL + extra), "threads": os.environ.get("OMP_NUM_THREADS"),
            "runs": rows}  # fmt: skip
    Path(args.results + ".json").write_text(json.dumps(data, indent=1) + "\n")
    Path(args.results + ".md").write_text(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
