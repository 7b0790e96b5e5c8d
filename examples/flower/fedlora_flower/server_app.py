"""The ServerApp: ``FedLoRAStrategy`` runs the rounds, aggregation is ``fedlora.aggregate``.

Per-client budgets come from each node's ``--node-config`` (``budget-rank=4``, ...), which the
node declares in its replies; until a node has declared one (the first round), and for nodes
that declare none, the run config's ``client-ranks = "2,4,8"`` gives the nodes (in ascending
node-id order) ranks 2, 4 and 8 (HetLoRA/FlexLoRA/PreLort: each downloads its rank prefix or its
best rank-r factors), ``client-heads = "1,2,4"`` the number of Ravan heads each trains.
The global model is evaluated on the server after every round. With ``result-file`` set, the
per-round metrics and the final global state go to that file (``torch.save``).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedlora.flower import FedLoRAStrategy, from_arrayrecord, to_arrayrecord
from fedlora_flower.task import (
    Settings,
    build_model,
    client_side,
    evaluate,
    full_budget,
    initial_state,
    load_data,
    parse_budgets,
)

app = ServerApp()


def make_strategy(settings: Settings, run_config: dict[str, Any], num_nodes: int) -> Any:
    """The strategy for this run (budgets from ``client-ranks`` / ``client-heads``)."""
    budgets = parse_budgets(run_config.get("client-ranks", ""), "rank")
    heads = parse_budgets(run_config.get("client-heads", ""), "heads")
    if heads:
        budgets = [
            {**(budgets[i % len(budgets)] if budgets else {}), **h} for i, h in enumerate(heads)
        ]
    fraction = float(run_config.get("fraction-train", 1.0))
    return FedLoRAStrategy(
        settings.method,
        budgets=budgets,
        fraction_train=fraction,
        fraction_evaluate=0.0,  # the global model is evaluated on the server instead
        min_train_nodes=max(1, int(fraction * num_nodes)),
        min_available_nodes=num_nodes,
        client_options=settings.client_options(),
        aggregate_options={"error": True},  # report the aggregation error of every round
    )


def server_evaluate(settings: Settings):
    """``evaluate_fn`` for ``strategy.start``: test accuracy of the global adapters."""
    data = load_data(settings)

    side = client_side(settings, full_budget(settings, {}), None)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model, tokenizer = build_model(settings, data["num_classes"], side)
        acc, loss = evaluate(model, tokenizer, from_arrayrecord(arrays), *data["test"], settings)
        return MetricRecord({"test_accuracy": acc, "test_loss": loss})

    return evaluate_fn


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds and print the per-round metrics."""
    run_config = dict(context.run_config)
    settings = Settings.from_run_config(run_config)
    # how many nodes to wait for; 0: those connected now
    num_nodes = int(run_config.get("num-nodes", 0)) or len(list(grid.get_node_ids()))
    strategy = make_strategy(settings, run_config, num_nodes)
    result = strategy.start(
        grid=grid,
        initial_arrays=to_arrayrecord(initial_state(settings)),
        num_rounds=int(run_config.get("num-server-rounds", 2)),
        train_config=ConfigRecord({"lr": settings.lr}),
        evaluate_fn=server_evaluate(settings),
    )
    context.state["result"] = ConfigRecord(
        {
            "test_accuracy": [
                float(m["test_accuracy"])
                for _, m in sorted(result.evaluate_metrics_serverapp.items())
            ]
        }
    )
    for rnd, metrics in sorted(result.train_metrics_clientapp.items()):
        print(
            f"round {rnd}: train loss {metrics.get('train_loss', float('nan')):.3f}, "
            f"aggregation error {metrics.get('aggregation_error', float('nan')):.2e}, "
            f"clients used {metrics.get('clients_used', 0)}, rejected {metrics.get('num_rejected', 0)}"
        )
    for rnd, metrics in sorted(result.evaluate_metrics_serverapp.items()):
        print(f"after round {rnd}: test accuracy {metrics['test_accuracy']:.3f}")
    if run_config.get("result-file"):
        save_result(str(run_config["result-file"]), result, strategy)


def save_result(path: str, result: Any, strategy: Any) -> None:
    """Write the run's per-round metrics and final global state to ``path`` (``torch.save``)."""

    def plain(records: dict) -> dict:
        return {int(r): dict(m) for r, m in records.items()}

    torch.save(
        {
            "train_metrics": plain(result.train_metrics_clientapp),
            "evaluate_metrics": plain(result.evaluate_metrics_serverapp),
            "global_state": dict(strategy.global_state or {}),
            "declared_budgets": dict(strategy.declared_budgets),
        },
        path,
    )
