"""``fedlora compare``: several methods on the same data partition, one table and one plot."""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.simulate.config import ConfigError, SimConfig
from fedlora.simulate.engine import (
    CKPT,
    _atomic_write,
    check_out_dir,
    check_plotting,
    clean_stale_temps,
    load_dataset,
    plot_curves,
    probe_writable,
    run,
)


def compare(configs: list[SimConfig], out: Path, *, progress: bool = True) -> list[dict]:
    """Run every config (same seed, so the same partition) into ``out/<method>`` and write
    ``out/results.md``, ``out/results.json`` and ``out/curves.png``. Returns the table rows.

    Before the first method trains: every config is validated, each method's directory is
    checked (a finished or checkpointed method is resumed, another config's run is refused), the
    data set is loaded and ``out`` is probed for writability; any problem is one
    :class:`ConfigError`. Without matplotlib the curves are skipped with one warning.
    """
    if not configs:
        raise ConfigError("--methods must name at least one method")
    methods = [c.method for c in configs]
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise ConfigError(f"--methods names {', '.join(dup)} more than once")
    for cfg in configs:
        cfg.validate()
    if not str(out).strip():
        raise ConfigError("--out must name a directory, got ''")
    out = Path(out).expanduser()
    for cfg in configs:
        check_out_dir(out / cfg.method, cfg, resume=(out / cfg.method / CKPT).exists())
    shared = {"dataset": load_dataset(configs[0])}
    probe_writable(out)
    clean_stale_temps(out)
    plot = check_plotting(None)
    rows, curves = [], {}
    for cfg in configs:
        print(f"== {cfg.method}", flush=True)
        result = run(
            cfg,
            out / cfg.method,
            resume=(out / cfg.method / CKPT).exists(),
            progress=progress,
            shared=shared,
            plot=plot,
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
    table = "\n".join(lines) + "\n"
    _atomic_write(out / "results.md", lambda p: Path(p).write_text(table))
    data = json.dumps({"config": configs[0].to_json(), "rows": rows}, indent=1)
    _atomic_write(out / "results.json", lambda p: Path(p).write_text(data))
    if plot:
        plot_curves(curves, out / "curves.png")
    print("\n".join(lines))
    return rows
