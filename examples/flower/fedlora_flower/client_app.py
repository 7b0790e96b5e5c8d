"""The ClientApp: load the server's payload, train locally, upload the adapter state.

Each client is a Flower SuperNode whose ``node_config`` holds ``partition-id`` and
``num-partitions`` (set by the simulation runtime, or by :class:`fedlora.flower.LocalGrid`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fedlora
from fedlora.flower import from_arrayrecord, train_reply
from fedlora_flower.task import (
    HEAD,
    Settings,
    build_model,
    client_data,
    load_data,
    train_local,
    upload,
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
    rank = config.get("rank")  # set by the server for heterogeneous-rank methods
    heads = config.get("heads")  # Ravan: how many heads this client trains per layer

    model, tokenizer = build_model(settings, load_data(settings)["num_classes"], "client")
    state = from_arrayrecord(msg.content["arrays"])
    # a rank-r prefix loads into the first r components; the layer then uses only those
    fedlora.set_adapter_state_dict(model, state, modules_to_save=HEAD)
    if settings.method == "ravan":
        from fedlora.methods.ravan import select_heads

        budget = int(heads) if heads is not None else settings.heads
        select_heads(model, budget, "weight", seed=settings.seed * 1000 + server_round * 31 + pid)

    texts, labels = client_data(settings, pid, num_partitions)
    loss = train_local(
        model, tokenizer, texts, labels, settings, seed=settings.seed + 7919 * server_round + pid
    )
    state, meta = upload(model, settings, int(rank) if rank is not None else None)
    return train_reply(msg, state, len(texts), meta=meta, metrics={"train_loss": loss})
