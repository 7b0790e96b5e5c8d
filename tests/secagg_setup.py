"""The synthetic SecAgg+ set-up shared by tests/test_secagg_flower.py (Flower's workflow on
:class:`fedlora.flower.LocalGrid`) and tests/test_secagg_simulation.py (the same workflow on
Flower's simulation engine, Ray): a small global per method, each client's download and a
deterministic seeded "local training", and the check of every round's global against the plain
rule (:func:`fedlora.aggregate`) within SecAgg's quantisation bound.

The check: each entry of the unmasked sum is off by less than ``n·Δ`` (``Δ = 2·clipping_range /
quantization_range``, :func:`fedlora.flower.secagg.tolerance`), so a mean ``S/D`` is off by at
most ``n·Δ·(1 + |S/D|) / (D − n·Δ)``, plus float32 storage.

A plain module (not a test file) that Ray's workers import for the ClientApp; it needs Flower:
import it after ``pytest.importorskip("flwr")``.
"""

from __future__ import annotations

import torch
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod

import fedlora
from fedlora.flower import secagg
from fedlora.flower import secagg_flower as sf
from fedlora.methods import prefix as prefix_mod

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


class SecAggClient(NumPyClient):
    """The client of both tests: client ``pid`` answers a fit with
    :func:`fedlora.flower.secagg_flower.secagg_fit_reply` on the synthetic training."""

    def __init__(self, method, keys, pid, clip=CLIP_RANGE, options=None):
        self.method, self.keys, self.pid = method, keys, pid
        self.clip, self.options = clip, options

    def fit(self, parameters, config):
        rnd, m = int(config["round"]), self.method
        return sf.secagg_fit_reply(
            m, self.keys, parameters, train(m, self.pid, rnd), download(m, self.pid),
            clip=self.clip, options=self.options,
        )  # fmt: skip


def client_app(method, keys, clip=CLIP_RANGE, options=None):
    """A Flower ``ClientApp`` with Flower's ``secaggplus_mod``; the node's ``partition-id``
    (from :class:`~fedlora.flower.LocalGrid` or the simulation engine) is the client id."""

    def client_fn(ctx):
        pid = int(ctx.node_config["partition-id"])
        return SecAggClient(method, keys, pid, clip, options).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def check_rounds_equal_plain_aggregation(method, history, rounds=2):
    """Every round's global in ``history`` (``history[0]`` the initial global) equals the plain
    rule on the same uploads (every client weight 1, HetLoRA with ``weighting='data'``) within
    the quantisation bound, and the round changed the global."""
    assert len(history) == rounds + 1, "every round must aggregate"
    keys = list(history[0])
    tol = secagg.tolerance(NODES, CLIP_RANGE, QUANT)
    for rnd in range(1, rounds + 1):
        g = history[rnd - 1]
        ups = [train(method, pid, rnd)(download(method, pid)(g)) for pid in range(NODES)]
        want, _ = fedlora.aggregate(
            method, g, [u for u, _ in ups], [1.0] * NODES, [m for _, m in ups],
            **({"weighting": "data"} if method == "hetlora" else {}),
        )  # fmt: skip
        got = history[rnd]
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
