"""Run the ServerApp against in-process ClientApps, without Ray or a SuperLink.

``python -m fedlora_flower.local --num-nodes 3 -c "num-server-rounds=2 method='hetlora'
client-ranks='2,4,8'"`` (or ``-c "task='sft' method='hafl' hafl-mode='truncate'"``) runs the same ``server_app`` and ``client_app`` objects that ``flwr
run`` would, through :class:`fedlora.flower.LocalGrid` (real Flower messages, one node after
another). The run config is read from this example's pyproject.toml, then overridden by ``-c``.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from fedlora.flower import LocalGrid

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def run_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of pyproject.toml updated with ``overrides``."""
    with open(PYPROJECT, "rb") as f:
        config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    unknown = sorted(set(overrides or {}) - set(config))
    if unknown:
        raise ValueError(f"unknown run-config keys {unknown}; known: {sorted(config)}")
    return {**config, **(overrides or {})}


def run(
    num_nodes: int = 3,
    overrides: dict[str, Any] | None = None,
    node_configs: list[dict[str, Any]] | None = None,
) -> Context:
    """Run the example in process; returns the server Context (``state["result"]`` holds the
    task's primary metric, accuracy or ROUGE-L, before training and after every round). ``node_configs[i]`` adds to node ``i``'s node config what
    ``flower-supernode --node-config`` would set (e.g. ``{"budget-rank": 2}``)."""
    from fedlora_flower.client_app import app as client_app
    from fedlora_flower.server_app import app as server_app

    config = run_config(overrides)
    config["num-nodes"] = num_nodes
    grid = LocalGrid(client_app, num_nodes, run_config=config, node_configs=node_configs)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    server_app(grid, context)
    return context


def _parse_overrides(text: str) -> dict[str, Any]:
    return tomllib.loads("\n".join(text.split())) if text.strip() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-nodes", type=int, default=3)
    parser.add_argument("-c", "--run-config", default="", help="TOML overrides, 'k1=v1 k2=v2'")
    parser.add_argument(
        "--node-config",
        action="append",
        default=None,
        help="node i's extra node config, once per node in order, e.g. 'budget-rank=2'",
    )
    args = parser.parse_args()
    nodes = [_parse_overrides(text) for text in args.node_config] if args.node_config else None
    if nodes is not None and len(nodes) != args.num_nodes:
        parser.error(f"--node-config given {len(nodes)} times for {args.num_nodes} nodes")
    run(args.num_nodes, _parse_overrides(args.run_config), nodes)


if __name__ == "__main__":
    main()
