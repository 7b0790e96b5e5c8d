"""SecAgg+ over Flower, offline: 2 rounds of Flower's own ``SecAggPlusWorkflow`` (server) and
``secaggplus_mod`` (ClientApp) on :class:`fedlora.flower.LocalGrid` (in process: Flower's
simulation engine needs Ray and a process per node, far above this test's budget, while the
grid delivers the same Messages through the same ClientApp dispatch and mods).

Each round's new global must equal the method's plain rule (:func:`fedlora.aggregate`) on the
same uploads up to SecAgg's quantisation: each entry of the unmasked sum is off by less than
``n·Δ`` (``Δ = 2·clipping_range / quantization_range``, :func:`fedlora.flower.secagg.tolerance`),
so a mean ``S/D`` is off by at most ``n·Δ·(1 + |S/D|) / (D − n·Δ)``, plus float32 storage.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fedlora
from fedlora.methods import prefix as prefix_mod

pytest.importorskip("flwr")
sf = pytest.importorskip("fedlora.flower.secagg_flower")
from fedlora.flower import secagg  # noqa: E402

LORA = {"l0": (5, 7), "l1": (3, 4)}
R, NODES = 4, 4
RAVAN = {"r0": (4, 3)}
RANKS = [1, 4, 2, 3]
HEADS = [1, 4, 2, 3]
CLIP_RANGE, QUANT = 8.0, 2**22


def initial(method):
    gen = torch.Generator().manual_seed(0)
    g = {"head.weight": torch.randn(2, 3, generator=gen)}
    if method == "ravan":
        for p, (h, r) in RAVAN.items():
            g[f"{p}.lora_H"] = torch.randn(h, r, r, generator=gen)
            g[f"{p}.lora_s"] = torch.ones(h)
    else:
        for p, (o, i) in LORA.items():
            g[f"{p}.lora_A.weight"] = torch.randn(R, i, generator=gen)
            g[f"{p}.lora_B.weight"] = torch.randn(o, R, generator=gen)
    return g


def download(method, pid):
    def fn(g):
        if method in ("prelort", "hetlora"):
            return prefix_mod.truncate(dict(g), RANKS[pid])
        return {k: v.clone() for k, v in g.items()}

    return fn


def train(method, pid, rnd):
    """A deterministic 'local training': a seeded step of size ~0.3 from the download."""

    def fn(down):
        gen = torch.Generator().manual_seed(100 * rnd + pid)
        meta = {}
        if method == "ravan":
            up = {"head.weight": down["head.weight"] + 0.3 * torch.randn(2, 3, generator=gen)}
            meta["heads"] = {}
            for p, (h, r) in RAVAN.items():
                heads = sorted(torch.randperm(h, generator=gen)[: HEADS[pid]].tolist())
                folded = down[f"{p}.lora_H"] * down[f"{p}.lora_s"][:, None, None]
                up[f"{p}.lora_H"] = folded[heads] + 0.3 * torch.randn(
                    len(heads), r, r, generator=gen
                )
                meta["heads"][p] = heads
            return up, meta
        up = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in down.items()}
        if method == "ffa":
            for p in LORA:
                up[f"{p}.lora_A.weight"] = down[f"{p}.lora_A.weight"]
        if method in ("prelort", "hetlora"):
            meta["rank"] = RANKS[pid]
        return up, meta

    return fn


@pytest.mark.parametrize("method", secagg.SECAGG_METHODS)
def test_two_secaggplus_rounds_equal_the_plain_aggregation(method):
    from flwr.app import Context, RecordDict
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from fedlora.flower import LocalGrid

    g0 = initial(method)
    keys = list(g0)
    options = {"weighting": "data"}

    class Client(NumPyClient):
        def __init__(self, pid):
            self.pid = pid

        def fit(self, parameters, config):
            rnd = int(config["round"])
            return sf.secagg_fit_reply(
                method, keys, parameters, train(method, self.pid, rnd),
                download(method, self.pid), clip=CLIP_RANGE, options=options,
            )  # fmt: skip

    app = ClientApp(
        client_fn=lambda ctx: Client(int(ctx.node_config["partition-id"])).to_client(),
        mods=[secaggplus_mod],
    )
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
    assert len(strategy.history) == 3, "both rounds must aggregate"

    tol = secagg.tolerance(NODES, CLIP_RANGE, QUANT)
    for rnd in (1, 2):
        g = strategy.history[rnd - 1]
        ups = [train(method, pid, rnd)(download(method, pid)(g)) for pid in range(NODES)]
        want, _ = fedlora.aggregate(
            method, g, [u for u, _ in ups], [1.0] * NODES, [m for _, m in ups],
            **({"weighting": "data"} if method == "hetlora" else {}),
        )  # fmt: skip
        got = strategy.history[rnd]
        for k, w in want.items():
            if method == "ravan" and k.endswith(".lora_H"):
                s = want.get(k[: -len("H")] + "s")
                w = w * s[:, None, None] if s is not None else w
            ref = g[k].double()
            if method == "ravan" and k.endswith(".lora_H"):
                ref = ref * g[k[: -len("H")] + "s"].double()[:, None, None]
            # a mean (S + d·ref)/D with |ΔS|, |Δd|, |ΔD| < tol and D ≥ 1 (one client of weight
            # 1 covers every index): off by ≤ tol·(1 + |ref| + |mean|) / (1 − tol); plus the
            # float32 storage of the new global
            big = float(ref.abs().max()) + float(w.double().abs().max())
            bound = tol * (1 + big) / (1 - tol) + 2**-23 * float(w.abs().max())
            err = float((got[k].double() - w.double()).abs().max())
            assert err <= bound, (rnd, k, err, bound)
        assert not torch.equal(got[keys[0]], g[keys[0]])  # the round changed the global
    np.testing.assert_equal(len(strategy.history), 3)


def test_dp_and_secaggplus_together_noise_the_unmasked_sum_and_count_epsilon():
    """DP with SecAgg+ (PreLort): clients clip to C before packing, the strategy adds N(0,
    (z·C)²) to the unmasked sum (seeded per round) and steps the accountant: the round's
    global is the layout's unpacking of the exact sum with the same noise, within the
    quantisation bound; ε is the accountant library's after 2 rounds."""
    from flwr.app import Context, RecordDict
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from fedlora import privacy
    from fedlora.flower import LocalGrid
    from fedlora.seeding import key

    method, C, z = "prelort", 0.5, 0.8
    g0 = initial(method)
    keys = list(g0)

    class Client(NumPyClient):
        def __init__(self, pid):
            self.pid = pid

        def fit(self, parameters, config):
            rnd = int(config["round"])
            return sf.secagg_fit_reply(
                method, keys, parameters, train(method, self.pid, rnd),
                download(method, self.pid), clip=C,
            )  # fmt: skip

    app = ClientApp(
        client_fn=lambda ctx: Client(int(ctx.node_config["partition-id"])).to_client(),
        mods=[secaggplus_mod],
    )
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
