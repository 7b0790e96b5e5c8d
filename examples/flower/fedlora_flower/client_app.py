"""The ClientApp: load the server's download, train locally as ``fedlora simulate`` does, upload.

Each client is a Flower SuperNode. Its ``node_config`` holds ``partition-id`` and
``num-partitions`` (set by the simulation runtime, by :class:`fedlora.flower.LocalGrid`, or by
``flower-supernode --node-config``) and, optionally, its own budget: ``budget-rank``,
``budget-heads``, ``budget-components``, ``budget-steps`` (see :mod:`fedlora.flower.budget`).
The node trains under that budget (else the one the server sent, else the run's defaults) and
declares it in its reply, so the server sends it the matching download from the next round on.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.flower import RANKS_KEY, client_budget, from_arrayrecord, node_budget, train_reply
from fedlora_flower.task import (
    Settings,
    build_model,
    client_data,
    client_side,
    fit_download,
    full_budget,
    load_data,
    load_global,
    train_local,
)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this node's partition."""
    settings = Settings.from_run_config(dict(context.run_config))
    pid = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    budget = full_budget(settings, client_budget(context.node_config, config))
    ranks = config.get(RANKS_KEY)  # the distinct ranks of the run's nodes (PreLort)

    side = client_side(settings, budget, list(ranks) if ranks else None)
    model, tokenizer = build_model(settings, load_data(settings)["num_classes"], side)
    state = load_global(model, from_arrayrecord(msg.content["arrays"]))
    state, budget = fit_download(side, settings, state, budget)
    data = client_data(settings, pid, num_partitions)
    upload, meta, loss = train_local(
        model, tokenizer, side, state, budget, data, settings, server_round, pid
    )
    declared = node_budget(context.node_config) or None  # what this node's operator set
    return train_reply(
        msg, upload, len(data[1]), meta=meta, metrics={"train_loss": loss}, budget=declared
    )
