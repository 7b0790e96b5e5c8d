"""The ServerApp: ``FedLoRAStrategy`` runs the rounds, aggregation is ``fedlora.aggregate``.

Per-node budgets come from each node's ``--node-config`` (``budget-rank=4``, ...), which the
node declares in its replies; until a node has declared one (the first round), and for nodes
that declare none, the run config's ``budgets`` (``fedlora simulate``'s ``--budgets`` spec,
e.g. ``"rank=2,4,8"``) or ``client-ranks = "2,4,8"`` / ``client-heads = "1,2,4"`` give the
nodes, in ascending node-id order, their budgets. The global adapter is evaluated on the server
after every round with the task's own metrics (``classify``: accuracy; ``sft``: perplexity,
ROUGE-L, exact match). With ``result-dir`` set, the final global adapter goes to
``<result-dir>/adapter.safetensors`` and the per-round metrics to
``<result-dir>/metrics.json``; with ``result-file``, both to one ``torch.save`` file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedlora.flower import FedLoRAStrategy, from_arrayrecord, to_arrayrecord
from fedlora_flower.task import evaluate, fallback_budgets, initial_state, run_setup, sim_config

app = ServerApp()


def make_strategy(cfg: Any, run_config: dict[str, Any], num_nodes: int) -> FedLoRAStrategy:
    """The strategy for this run (fallback budgets from ``budgets`` / ``client-ranks`` /
    ``client-heads``)."""
    fraction = float(run_config.get("fraction-train", 1.0))
    return FedLoRAStrategy(
        cfg.method,
        budgets=fallback_budgets(cfg),
        fraction_train=fraction,
        fraction_evaluate=0.0,  # the global model is evaluated on the server instead
        min_train_nodes=max(1, int(fraction * num_nodes)),
        min_available_nodes=num_nodes,
        client_options=cfg.client_options(),
        aggregate_options={"error": True},  # report the aggregation error of every round
        seed=cfg.seed,
    )


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def server_evaluate(cfg: Any, log: list[dict[str, Any]]):
    """``evaluate_fn`` for ``strategy.start``: the task's metrics of the global adapter."""

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = evaluate(cfg, from_arrayrecord(arrays))
        log.append({"round": server_round, **metrics})
        return MetricRecord(_numbers(metrics))

    return evaluate_fn


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds and print the per-round metrics."""
    run_config = dict(context.run_config)
    # how many nodes to wait for; 0: those connected now
    num_nodes = int(run_config.get("num-nodes", 0)) or len(list(grid.get_node_ids()))
    cfg = sim_config(run_config, max(1, num_nodes))
    task = run_setup(cfg).task
    strategy = make_strategy(cfg, run_config, num_nodes)
    evaluations: list[dict[str, Any]] = []
    result = strategy.start(
        grid=grid,
        initial_arrays=to_arrayrecord(initial_state(cfg)),
        num_rounds=int(run_config.get("num-server-rounds", 2)),
        train_config=ConfigRecord({"lr": float(cfg.lr)}),
        evaluate_fn=server_evaluate(cfg, evaluations),
    )
    context.state["result"] = ConfigRecord(
        {
            task.primary: [
                float(m[task.primary]) for _, m in sorted(result.evaluate_metrics_serverapp.items())
            ]
        }
    )
    for rnd, metrics in sorted(result.train_metrics_clientapp.items()):
        if metrics.get("aggregation_failed", 0):
            why = strategy.round_errors.get(rnd) or f"round {rnd}: no client update was used"
            print(f"{why}; global adapter unchanged")
            continue
        print(
            f"round {rnd}: train loss {_fmt(metrics.get('train_loss'))}, "
            f"aggregation error {_fmt(metrics.get('aggregation_error'), '.2e')}, "
            f"clients used {metrics.get('clients_used', 0)}, rejected {metrics.get('num_rejected', 0)}"
        )
    for row in evaluations:
        print(f"after round {row['round']}: {task.round_line(row)}")
    save_result(run_config, result, strategy, evaluations)


def _fmt(value: Any, spec: str = ".3f") -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def save_result(
    run_config: dict[str, Any], result: Any, strategy: Any, evaluations: list[dict[str, Any]]
) -> None:
    """``result-dir``: ``adapter.safetensors`` (the final global state, with FLoRA/FedEx-LoRA's
    accumulated base merges) and ``metrics.json``; ``result-file``: both in one
    ``torch.save`` file (with the budgets the nodes declared)."""

    def plain(records: dict) -> dict:
        return {int(r): dict(m) for r, m in records.items()}

    state = {k: v.contiguous() for k, v in (strategy.global_state or {}).items()}
    if run_config.get("result-dir"):
        from safetensors.torch import save_file

        out = Path(str(run_config["result-dir"])).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "adapter.safetensors"), metadata={"method": strategy.method})
        rows = {
            "train": plain(result.train_metrics_clientapp),
            "evaluate": [
                {k: v for k, v in row.items() if k != "samples" or isinstance(v, list)}
                for row in evaluations
            ],
            "declared_budgets": {str(k): v for k, v in strategy.declared_budgets.items()},
        }
        (out / "metrics.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    if run_config.get("result-file"):
        torch.save(
            {
                "train_metrics": plain(result.train_metrics_clientapp),
                "evaluate_metrics": plain(result.evaluate_metrics_serverapp),
                "global_state": state,
                "declared_budgets": dict(strategy.declared_budgets),
            },
            str(run_config["result-file"]),
        )
