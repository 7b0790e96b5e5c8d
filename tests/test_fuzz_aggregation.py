"""Property-based fuzz of the server API (DESIGN §7): ``aggregate`` and ``Aggregator``.

Random methods, client counts, ranks, weights and metas, with some clients corrupted (NaN/inf,
wrong shapes, keys or dtypes, malformed metas, a non-dict state) and some carrying valid but
extreme values (huge, tiny). Whatever the draw:

- the call returns (a documented ``ValueError`` only when no weight is positive);
- the new global state is finite, with the global's keys, shapes and dtypes;
- every corrupted client is rejected and named by index, every valid client is used;
- the inputs are not modified; two identical calls give bitwise identical results;
- streaming (:class:`Aggregator`) equals the batch call for the streaming methods.

Profiles: ``default`` (CI, a few hundred cases) and ``thorough`` (5,000 cases, run by hand:
``HYPOTHESIS_PROFILE=thorough pytest tests/test_fuzz_aggregation.py``).
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedlora.aggregation import METHODS, STREAMING_METHODS, Aggregator, aggregate  # noqa: E402

settings.register_profile(
    "default",
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")

PREFIX_METHODS = ("hetlora", "prelort", "flexlora", "flora")
BAD_STATE = ("nan", "inf", "shape", "missing", "extra", "int_dtype", "not_tensor", "not_dict")
BAD_META = {
    "ravan": ("index_range", "index_negative", "index_float", "index_str", "heads_list", "path"),
    "hafl": ("index_range", "index_negative", "index_float", "index_str", "updated_list"),
    "hetlora": ("rank_str", "rank_wrong"),
    "prelort": ("rank_str", "rank_wrong"),
    "flexlora": ("rank_str", "rank_wrong"),
    "flora": ("rank_str", "rank_wrong"),
}
EXTREME = (1e30, 1e-30, 3e38, 1e-38)
WEIGHTS = (0.0, 1e-300, 1e-30, 0.5, 1.0, 7.0, 1e6, 1e39, 1e300, 1e308)


def _lora_keys(path: str) -> tuple[str, str]:
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def build_case(data, method: str):
    """A valid global state and C valid clients (states, metas) for ``method``."""
    n_layers = data.draw(st.integers(1, 2), label="layers")
    paths = [f"m.{i}" for i in range(n_layers)]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    n = data.draw(st.integers(1, 5), label="clients")
    head = data.draw(st.booleans(), label="head")
    g: dict[str, torch.Tensor] = {}
    dims = {}
    for p in paths:
        d_in, d_out = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
        if method == "ravan":
            h, r = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
            g[f"{p}.lora_H"] = torch.randn(h, r, r, generator=gen)
            g[f"{p}.lora_s"] = torch.ones(h)
            dims[p] = (h, r)
        else:
            R = data.draw(st.integers(1, 4))
            a, b = _lora_keys(p)
            g[a] = torch.randn(R, d_in, generator=gen)
            g[b] = torch.randn(d_out, R, generator=gen)
            dims[p] = (R,)
    if head:
        g["head.weight"] = torch.randn(2, 3, generator=gen)
    clients, metas = [], []
    for _ in range(n):
        state, meta = {}, {}
        for p in paths:
            if method == "ravan":
                h, r = dims[p]
                state[f"{p}.lora_H"] = torch.randn(h, r, r, generator=gen)
                state[f"{p}.lora_s"] = torch.ones(h)
                if data.draw(st.booleans()):
                    k = data.draw(st.integers(0, h))
                    heads = sorted(torch.randperm(h, generator=gen)[:k].tolist())
                    meta.setdefault("heads", {})[p] = heads
                    if 1 <= k < h and data.draw(st.booleans(), label="compact"):
                        # the trained heads only (DESIGN §4), s folded in or sent per head
                        state[f"{p}.lora_H"] = torch.randn(k, r, r, generator=gen)
                        if data.draw(st.booleans(), label="compact s"):
                            state[f"{p}.lora_s"] = torch.rand(k, generator=gen) + 0.5
                        else:
                            del state[f"{p}.lora_s"]
                continue
            (R,) = dims[p]
            a, b = _lora_keys(p)
            r = data.draw(st.integers(1, R)) if method in PREFIX_METHODS else R
            if method in PREFIX_METHODS and data.draw(st.booleans()):
                meta.setdefault("rank", {})[p] = r
            state[a] = torch.randn(r, g[a].shape[1], generator=gen)
            state[b] = torch.randn(g[b].shape[0], r, generator=gen)
            if method == "ffa":
                state[a] = g[a].clone()
            if method == "hafl" and data.draw(st.booleans()):
                k = data.draw(st.integers(0, R))
                meta.setdefault("updated", {})[p] = sorted(
                    torch.randperm(R, generator=gen)[:k].tolist()
                )
        if head:
            state["head.weight"] = torch.randn(2, 3, generator=gen)
        clients.append(state)
        metas.append(meta)
    return g, clients, metas, paths


def corrupt_state(data, state: dict, kind: str):
    key = data.draw(st.sampled_from(sorted(state)), label="corrupted key")
    t = state[key]
    if kind == "not_dict":
        return [t]
    state = dict(state)
    if kind in ("nan", "inf"):
        if t.numel() == 0:
            return [t]
        t = t.clone()
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = (
            math.nan if kind == "nan" else -math.inf
        )
        state[key] = t
    elif kind == "shape":
        state[key] = torch.randn(*t.shape, 2) if t.dim() else torch.randn(2)
    elif kind == "missing":
        del state[key]
        if key.endswith(".lora_A.weight"):  # FFA-LoRA clients may omit A: drop B instead
            state.pop(key.replace(".lora_A.", ".lora_B."))
        if key.endswith(".lora_s"):  # Ravan clients may omit s (= 1): drop H instead
            state.pop(key.replace(".lora_s", ".lora_H"))
    elif kind == "extra":
        state["not.in.global"] = torch.randn(2)
    elif kind == "int_dtype":
        state[key] = torch.ones(t.shape, dtype=torch.int64)
    elif kind == "not_tensor":
        state[key] = t.tolist()
    return state


def corrupt_meta(data, method: str, meta: dict, paths, g) -> dict | object:
    kind = data.draw(st.sampled_from(BAD_META[method]), label="meta corruption")
    p = data.draw(st.sampled_from(paths))
    meta = dict(meta)
    if method == "ravan":
        h = g[f"{p}.lora_H"].shape[0]
        field = "heads"
    else:
        h = g[f"{p}.lora_A.weight"].shape[0]
        field = "updated"
    bad_index = {
        "index_range": h,
        "index_negative": -1,
        "index_float": 0.7,
        "index_str": "0",
    }
    if kind in bad_index:
        meta[field] = {**meta.get(field, {}), p: [bad_index[kind]]}
    elif kind in ("heads_list", "updated_list"):
        meta[field] = [0]
    elif kind == "path":
        meta[field] = {"no.such.layer": [0]}
    elif kind == "rank_str":
        meta["rank"] = "2"
    elif kind == "rank_wrong":
        r = g[f"{p}.lora_B.weight"].shape[1]
        meta["rank"] = {p: r + 1}
    return meta


def snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    return obj


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)) or (
            isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool((a.isnan() & b.isnan() | (a == b)).all())
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@settings.get_profile(PROFILE)
@given(data=st.data())
def test_aggregate_survives_any_client(data):
    method = data.draw(st.sampled_from(METHODS), label="method")
    g, clients, metas, paths = build_case(data, method)
    n = len(clients)
    weights = [data.draw(st.sampled_from(WEIGHTS), label=f"w{k}") for k in range(n)]
    bad: set[int] = set()
    for k in range(n):
        what = data.draw(st.sampled_from(("good", "good", "extreme", "state", "meta")))
        if what == "extreme":
            scale = data.draw(st.sampled_from(EXTREME))
            key = data.draw(st.sampled_from(sorted(clients[k])))
            if not (method == "ffa" and key.endswith(".lora_A.weight")) and not key.endswith(
                ".lora_s"
            ):
                t = clients[k][key]  # largest |value| = scale: finite in float32
                clients[k][key] = (t.double() / t.abs().max().clamp_min(1e-12) * scale).float()
        elif what == "state":
            kind = data.draw(st.sampled_from(BAD_STATE), label="state corruption")
            clients[k] = corrupt_state(data, clients[k], kind)
            bad.add(k)
        elif what == "meta" and method in BAD_META:
            metas[k] = corrupt_meta(data, method, metas[k], paths, g)
            bad.add(k)
    before = snapshot((g, clients, metas))
    if not any(w > 0 for w in weights):
        with pytest.raises(ValueError, match="weights"):
            aggregate(method, g, clients, weights, metas)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new, metrics = aggregate(method, g, clients, weights, metas)
        again, _ = aggregate(method, g, clients, weights, metas)
    assert same((g, clients, metas), before), "aggregate modified its inputs"
    rejected = {r["client"] for r in metrics["rejected"]}
    assert rejected == bad, (metrics["rejected"], bad)
    for r in metrics["rejected"]:
        assert isinstance(r["reason"], str) and r["reason"]
    good = [k for k in range(n) if k not in bad]
    if sum(weights[k] for k in good) > 0:
        assert metrics["used"] == good
    else:  # nobody usable: the global comes back unchanged
        assert metrics["used"] == []
        assert all(torch.equal(new[k], g[k]) for k in g)
    assert math.isfinite(sum(metrics["weights"])) and all(
        math.isfinite(w) for w in metrics["weights"]
    )
    for key, t in g.items():
        assert new[key].shape == t.shape and new[key].dtype == t.dtype, key
    for key, t in new.items():
        assert bool(torch.isfinite(t).all()), f"{method}: {key} not finite"
        assert torch.equal(t, again[key]), f"{method}: {key} not deterministic"
    err = metrics["aggregation_error"]
    assert math.isnan(err) or err >= 0
    if method in STREAMING_METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            agg = Aggregator(method, g)
            for state, w, meta in zip(clients, weights, metas, strict=True):
                agg.add(state, w, meta)
            streamed, smetrics = agg.result()
        assert {r["client"] for r in smetrics["rejected"]} == bad
        for key, t in new.items():
            s = streamed[key]
            assert bool(torch.isfinite(s).all()), f"streamed {key} not finite"
            scale = float(t.abs().max()) if t.numel() else 0.0
            tol = 1e-5 * max(scale, 1e-30) * n
            assert (
                float(
                    (s.double() - t.double()).abs().max(),
                )
                <= tol
                if t.numel()
                else True
            ), key
