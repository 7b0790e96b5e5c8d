"""Utility under client-level DP on the EMBEDDED classify task, per method, at a scale where
DP-FedAvg learns: the README's table at ε ∈ {1, 4, 8} beside the non-private run.

Each cell is one ``fedlora simulate --task classify`` process (MiniLM-L6 on the standard-library
topics set) with the settings below; the DP cells add ``--dp-clip C --dp-epsilon E --dp-delta
1e-5`` (the noise multiplier is calibrated to reach E after the last round). The methods run with
the restriction DP needs (``fedlora.privacy.DP_SEMANTICS``): HetLoRA with data weights, Ravan with
its default public head choice, HAFL in truncation mode; FLoRA, FedEx-LoRA and FLoRA-NA are
refused under DP and are not run. Results go to a JSON file after every cell, so an interrupted
run resumes where it stopped; the markdown table is printed at the end::

    python bench/privacy_embedded.py --out bench/results/privacy-embedded-cpu.json
    python bench/privacy_embedded.py --out ... --table   # print the table of what is there
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("fedit", "ffa", "prelort", "hetlora", "ravan", "hafl", "flexlora")
EXTRA = {"hetlora": ["--hetlora-weighting", "data"], "hafl": ["--hafl-mode", "truncate"]}
SETTINGS = [
    "--task", "classify", "--clients", "100", "--clients-per-round", "50", "--rank", "2",
    "--rounds", "5", "--local-steps", "2", "--budgets", "hetero", "--max-test", "0",
]  # fmt: skip
CLIP, DELTA = 1.0, 1e-5


def cell_args(method: str, eps: float | None, seed: int) -> list[str]:
    """The ``fedlora simulate`` arguments of one cell (``eps=None``: no DP)."""
    args = [*SETTINGS, "--method", method, "--seed", str(seed), *EXTRA.get(method, [])]
    if eps is not None:
        args += ["--dp-clip", str(CLIP), "--dp-epsilon", str(eps), "--dp-delta", str(DELTA)]
    return args


def run_cell(fedlora: str, method: str, eps: float | None, seed: int) -> dict:
    """Run one cell in its own process; its final round, curve and wall time."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [fedlora, "simulate", *cell_args(method, eps, seed), "--no-progress", "--out", out]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1:], "wall_s": wall}
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    rounds = metrics["rounds"]
    return {
        "accuracy": [r["test_accuracy"] for r in rounds],
        "initial_accuracy": metrics["initial"]["test_accuracy"],
        "epsilon": rounds[-1].get("epsilon"),
        "noise_multiplier": rounds[-1].get("dp_noise_multiplier"),
        "rejected": sum(r.get("dp_rejected", 0) or 0 for r in rounds),
        "wall_s": wall,
        "command": "fedlora simulate " + " ".join(cell_args(method, eps, seed)),
    }


def key(method: str, eps: float | None, seed: int) -> str:
    return f"{method}|{'none' if eps is None else f'{eps:g}'}|{seed}"


def table(results: dict, methods: list[str], eps_list: list[float], seeds: list[int]) -> str:
    """The README table: final test accuracy per method and ε (mean over seeds)."""
    head = "| method | no DP | " + " | ".join(f"ε = {e:g}" for e in eps_list) + " |"
    lines = [head, "|---" * (2 + len(eps_list)) + "|"]
    for m in methods:
        cells = []
        for e in [None, *eps_list]:
            got = [results.get(key(m, e, s)) for s in seeds]
            got = [g for g in got if g and "accuracy" in g]
            if not got:
                cells.append("—")
                continue
            acc = sum(g["accuracy"][-1] for g in got) / len(got)
            z = got[0]["noise_multiplier"]
            cells.append(f"{acc:.3f}" + (f" (z {z:.2f})" if z is not None else ""))
        label = {"hetlora": "hetlora (data weights)", "hafl": "hafl (truncate)"}.get(m, m)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="results JSON (resumed when present)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--eps", type=float, nargs="+", default=[8.0, 4.0, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not args.table:
        fedlora = str(Path(sys.executable).with_name("fedlora"))
        # the no-DP and the largest-ε cells of every method first, the smaller ε after them
        eps_sorted = sorted(args.eps, reverse=True)
        passes = [[None, *eps_sorted[:1]], eps_sorted[1:]]
        for seed, cells, method in (
            (seed, cells, method)
            for seed in args.seeds
            for cells in passes
            for method in args.methods
        ):
            for eps in cells:
                k = key(method, eps, seed)
                if k in results and "accuracy" in results[k]:
                    continue
                results[k] = run_cell(fedlora, method, eps, seed)
                r = results[k]
                print(k, r.get("accuracy", r.get("error")), f"{r['wall_s']:.0f}s", flush=True)
                args.out.write_text(json.dumps(results, indent=1) + "\n")
        results["_machine"] = {"cpus": os.cpu_count(), "omp": os.environ.get("OMP_NUM_THREADS")}
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results, args.methods, sorted(args.eps, reverse=True), args.seeds), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
