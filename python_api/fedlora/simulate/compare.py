"""``fedlora compare``: several methods on the same data partition, one table and one plot."""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.simulate.config import SimConfig
from fedlora.simulate.engine import load_dataset, plot_curves, run


def compare(configs: list[SimConfig], out: Path, *, progress: bool = True) -> list[dict]:
    """Run every config (same seed, so the same partition) into ``out/<method>`` and write
    ``out/results.md``, ``out/results.json`` and ``out/curves.png``. Returns the table rows."""
    out.mkdir(parents=True, exist_ok=True)
    shared = {"dataset": load_dataset(configs[0])}
    rows, curves = [], {}
    for cfg in configs:
        print(f"== {cfg.method}", flush=True)
        result = run(
            cfg,
            out / cfg.method,
            resume=(out / cfg.method / "checkpoint.json").exists(),
            progress=progress,
            shared=shared,
        )
        last = result.rounds[-1]
        curves[cfg.method] = result.rounds
        rows.append(
            {
                "method": cfg.method,
                "final_accuracy": last["test_accuracy"],
                "best_accuracy": max(r["test_accuracy"] for r in result.rounds),
                "final_loss": last["test_loss"],
                "mean_aggregation_error": sum(r["aggregation_error"] for r in result.rounds)
                / len(result.rounds),
                "MiB_up_per_round": sum(r["bytes_up"] for r in result.rounds)
                / len(result.rounds)
                / 2**20,
                "seconds_per_round": sum(r["seconds"] for r in result.rounds) / len(result.rounds),
            }
        )
    header = (
        "| method | final acc | best acc | final loss | mean agg. error | MiB up/round | s/round |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['final_accuracy']:.3f} | {r['best_accuracy']:.3f} | {r['final_loss']:.3f} "
            f"| {r['mean_aggregation_error']:.2e} | {r['MiB_up_per_round']:.2f} | {r['seconds_per_round']:.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps({"config": configs[0].to_json(), "rows": rows}, indent=1)
    )
    plot_curves(curves, out / "curves.png")
    print("\n".join(lines))
    return rows
