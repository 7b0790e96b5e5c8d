"""SecAgg+ over Flower, offline: 2 rounds of Flower's own ``SecAggPlusWorkflow`` (server) and
``secaggplus_mod`` (ClientApp) on :class:`fedlora.flower.LocalGrid` (in process: the grid
delivers the same Messages through the same ClientApp dispatch and mods as Flower's engines, in
well under a second per method). tests/test_secagg_simulation.py runs the same set-up and check on
Flower's simulation engine (Ray, a ClientApp per Ray actor), slow: one method by default,
``FEDLORA_FLOWER_SIM_ALL=1`` for all five.

Each round's new global must equal the method's plain rule (:func:`fedlora.aggregate`) on the
same uploads up to SecAgg's quantisation: each entry of the unmasked sum is off by less than
``n·Δ`` (``Δ = 2·clipping_range / quantization_range``, :func:`fedlora.flower.secagg.tolerance`),
so a mean ``S/D`` is off by at most ``n·Δ·(1 + |S/D|) / (D − n·Δ)``, plus float32 storage. The
synthetic set-up and the check live in tests/secagg_setup.py, shared by both tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
sf = pytest.importorskip("fedlora.flower.secagg_flower")
from secagg_setup import (  # noqa: E402
    CLIP_RANGE,
    NODES,
    QUANT,
    check_rounds_equal_plain_aggregation,
    client_app,
    download,
    initial,
    train,
)

from fedlora.flower import secagg  # noqa: E402


@pytest.mark.parametrize("method", secagg.SECAGG_METHODS)
def test_two_secaggplus_rounds_equal_the_plain_aggregation(method):
    from flwr.app import Context, RecordDict
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from fedlora.flower import LocalGrid

    g0 = initial(method)
    keys = list(g0)
    options = {"weighting": "data"}
    app = client_app(method, keys, options=options)
    strategy = sf.SecAggStrategy(
        method, keys, initial_state=g0, options=options, fraction_fit=1.0,
        min_fit_clients=NODES, min_available_clients=NODES, fraction_evaluate=0.0,
        min_evaluate_clients=0, on_fit_config_fn=lambda r: {"round": r},
    )  # fmt: skip
    grid = LocalGrid(app, NODES)
    grid.set_run(SimpleNamespace(run_id=1))  # the legacy client manager reads grid.run.run_id
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(ctx, config=ServerConfig(num_rounds=2), strategy=strategy)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)
    )
    workflow(grid, legacy)
    check_rounds_equal_plain_aggregation(method, strategy.history)


def test_dp_and_secaggplus_together_noise_the_unmasked_sum_and_count_epsilon():
    """DP with SecAgg+ (PreLort): clients clip to C before packing, the strategy adds N(0,
    (z·C)²) to the unmasked sum (seeded per round) and steps the accountant: the round's
    global is the layout's unpacking of the exact sum with the same noise, within the
    quantisation bound; ε is the accountant library's after 2 rounds."""
    from flwr.app import Context, RecordDict
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from fedlora import privacy
    from fedlora.flower import LocalGrid
    from fedlora.seeding import key

    method, C, z = "prelort", 0.5, 0.8
    g0 = initial(method)
    keys = list(g0)

    app = client_app(method, keys, clip=C)
    dp = privacy.DPConfig(clip=C, noise_multiplier=z, denominator="sampled")
    acc = privacy.PrivacyAccountant.for_config(dp, 1.0)
    strategy = sf.SecAggStrategy(
        method, keys, initial_state=g0, dp=dp, accountant=acc, seed=7, fraction_fit=1.0,
        min_fit_clients=NODES, min_available_clients=NODES, fraction_evaluate=0.0,
        min_evaluate_clients=0, on_fit_config_fn=lambda r: {"round": r},
    )  # fmt: skip
    grid = LocalGrid(app, NODES)
    grid.set_run(SimpleNamespace(run_id=1))
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(ctx, config=ServerConfig(num_rounds=2), strategy=strategy)
    DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2))(
        grid, legacy
    )
    assert len(strategy.history) == 3 and acc.rounds == 2
    assert acc.epsilon == pytest.approx(privacy.epsilon(2, 1.0, z, 1e-5), rel=1e-12)
    tol = secagg.tolerance(NODES, CLIP_RANGE, QUANT)
    for rnd in (1, 2):
        g = strategy.history[rnd - 1]
        layout = secagg.Layout(method, g)
        vecs = []
        for pid in range(NODES):
            down = download(method, pid)(g)
            up, meta = train(method, pid, rnd)(down)
            vecs.append(layout.pack(down, up, meta, clip=C))
        gen = torch.Generator().manual_seed(key(7, rnd, 19))
        want, _ = layout.unpack(np.sum(vecs, axis=0), noise_std=z * C, generator=gen)
        for k, w in want.items():
            big = float(g[k].abs().max()) + float(w.abs().max())
            bound = tol * (1 + big) / (1 - tol) + 2**-23 * float(w.abs().max())
            err = float((strategy.history[rnd][k].double() - w.double()).abs().max())
            assert err <= bound, (rnd, k, err, bound)
