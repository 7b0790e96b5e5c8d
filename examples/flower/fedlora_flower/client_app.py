"""The ClientApp: one node's local training with :class:`fedlora.local.LocalClient`.

Each node is a Flower SuperNode. Its ``node_config`` holds ``partition-id`` (the node's client
id in the run's partition) and ``num-partitions`` (set by the simulation runtime, by
:class:`fedlora.flower.LocalGrid`, or by ``flower-supernode --node-config``) and, optionally,
its own budget: ``budget-rank``, ``budget-heads``, ``budget-components``, ``budget-steps``
(:mod:`fedlora.flower.budget`). The node trains under that budget (else the one the server
sent, else the run's defaults) and declares it in its reply, so the server sends it the
matching download from the next round on.

A round here is exactly a round of ``fedlora simulate --engine sequential`` for this client:
the same model, the same batches (:func:`fedlora.local.sample_batches`), the same seed
(:func:`fedlora.local.client_seed` of the run seed, ``server-round - 1`` and the partition id),
the same method hooks; the server's hand-back (HAFL truncation's averaged scores) arrives in
the train config.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.flower import (
    RANKS_KEY,
    client_budget,
    decode_handback,
    from_arrayrecord,
    node_budget,
    train_reply,
)
from fedlora.local import LocalClient, client_seed, sample_batches
from fedlora_flower.task import (
    client_side,
    fit_download,
    fresh_model,
    run_setup,
    sim_config,
)
from fedlora_flower.task import node_budget as full_node_budget

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this node's partition."""
    pid = int(context.node_config["partition-id"])
    cfg = sim_config(dict(context.run_config), int(context.node_config["num-partitions"]))
    config = msg.content["config"]
    round_idx = int(config["server-round"]) - 1  # fedlora.rounds counts from 0
    budget = full_node_budget(cfg, client_budget(context.node_config, config))
    ranks = config.get(RANKS_KEY)  # the distinct ranks of the run's nodes (PreLort)
    handback = decode_handback(config)

    setup = run_setup(cfg)
    model = fresh_model(cfg)
    side = client_side(cfg, list(ranks) if ranks else None)
    side.setup(model)
    download, budget = fit_download(side, cfg, from_arrayrecord(msg.content["arrays"]), budget)
    client = LocalClient(
        cfg.method,
        model,
        loss=setup.task,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        options=cfg.client_options(),
        side=side,
        **cfg.train_options(),  # lr-scheduler, grad-accum, ... as fedlora simulate's
    )
    steps = side.pre_steps(budget) + budget.steps
    batches = sample_batches(setup.parts[pid], cfg.batch_size, steps, cfg.seed, round_idx, pid)
    result = client.train(
        download,
        budget,
        [setup.train.take(b) for b in batches],
        seed=client_seed(cfg.seed, round_idx, pid),
        round_idx=round_idx,
        client=pid,
        num_examples=int(setup.weights[pid]),
        handback=handback,
    )
    declared = node_budget(context.node_config) or None  # what this node's operator set
    return train_reply(
        msg,
        result.state,
        result.num_examples,
        meta=result.meta,
        metrics={"train_loss": result.metrics["train_loss"]},
        budget=declared,
    )
