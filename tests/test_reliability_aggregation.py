"""The server's reliability contract (DESIGN §7), one test per failure class.

- a malformed meta is rejected and named, the other clients aggregated (every method that reads
  metas, through ``aggregate``, ``Aggregator`` and the Flower strategy);
- a rule that fails on one client the validation let through loses that client, not the round;
- finite input never overflows: huge or tiny weights, huge or tiny values, norms that overflow
  float32 (a finite client is never called "NaN/inf").

Oracles are float64 sums written out in the tests.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from fedlora import methods as fm
from fedlora.aggregation import Aggregator, aggregate
from fedlora.methods import fedit

PATHS = ("enc.0.q", "enc.1.v")
D_IN, D_OUT, R, HEADS = 7, 5, 3, 3


def lora(rank=R, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for p in PATHS:
        out[f"{p}.lora_A.weight"] = torch.randn(rank, D_IN, generator=gen) * scale
        out[f"{p}.lora_B.weight"] = torch.randn(D_OUT, rank, generator=gen) * scale
    out["head.weight"] = torch.randn(2, D_OUT, generator=gen) * scale
    return out


def ravan(seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for p in PATHS:
        out[f"{p}.lora_H"] = torch.randn(HEADS, 2, 2, generator=gen)
        out[f"{p}.lora_s"] = torch.ones(HEADS)
    return out


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def mean64(states, weights, key):
    """The float64 weighted mean of one key."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    return sum(wk * s[key].double() for wk, s in zip(w, states, strict=True))


# ------------------------------------------------------------------------------ malformed metas
BAD_METAS = [
    ("ravan", {"heads": {PATHS[0]: [HEADS]}}, "ints in [0, 3)"),  # out of range
    ("ravan", {"heads": {PATHS[0]: [-1]}}, "ints in [0, 3)"),  # would read as the last head
    ("ravan", {"heads": {PATHS[0]: [0.7]}}, "ints in [0, 3)"),
    ("ravan", {"heads": {PATHS[0]: [True]}}, "ints in [0, 3)"),
    ("ravan", {"heads": {PATHS[0]: "01"}}, "list of ints"),
    ("ravan", {"heads": {PATHS[0]: [0, 0]}}, "repeated"),
    ("ravan", {"heads": [0, 1]}, "{path: ...} dict"),
    ("ravan", {"heads": {"enc.9.x": [0]}}, "not in the global state"),
    ("ravan", {"heads": {PATHS[0]: torch.tensor([0.0])}}, "list of ints"),
    ("hafl", {"updated": {"enc.9.x": [0]}}, "not in the global state"),
    ("hafl", {"updated": {PATHS[0]: [-1]}}, "ints in [0, 3)"),
    ("hafl", {"scores": [1.0, 2.0]}, "{path: ...} dict"),
    ("hetlora", {"rank": "3"}, "meta 'rank'"),
    ("prelort", {"rank": {PATHS[0]: 2}}, "declares rank 2"),
    ("flexlora", {"rank": 2.0}, "meta 'rank'"),
]


@pytest.mark.parametrize(("method", "meta", "reason"), BAD_METAS)
def test_a_malformed_meta_rejects_that_client_only(method, meta, reason):
    make = ravan if method == "ravan" else lora
    g, clients = make(seed=0), [make(seed=s) for s in (1, 2, 3)]
    metas = [{}, meta, {}]
    new, m = aggregate(method, g, clients, [1.0, 2.0, 3.0], metas)
    assert m["used"] == [0, 2]
    ((entry,),) = [m["rejected"]]
    assert entry["client"] == 1 and reason in entry["reason"], entry
    want, _ = aggregate(method, g, [clients[0], clients[2]], [1.0, 3.0], [{}, {}])
    for k in want:
        assert torch.equal(new[k], want[k]), k
    if method in ("hafl", "hetlora", "prelort"):  # streaming: the same verdict
        agg = Aggregator(method, g)
        assert [
            agg.add(c, w, mt) for c, w, mt in zip(clients, [1.0, 2.0, 3.0], metas, strict=True)
        ] == [
            True,
            False,
            True,
        ]


def test_valid_meta_spellings_are_accepted():
    """numpy integers and integer tensors are ints; an empty head list trains no head."""
    g, clients = ravan(0), [ravan(1), ravan(2)]
    metas = [
        {"heads": {PATHS[0]: [np.int64(1)], PATHS[1]: torch.tensor([0, 2])}},
        {"heads": {PATHS[0]: []}},
    ]
    new, m = aggregate("ravan", g, clients, [1.0, 1.0], metas)
    assert m["rejected"] == [] and m["used"] == [0, 1]
    H = f"{PATHS[0]}.lora_H"
    # head 1 of layer 0: client 0 alone; head 0: nobody (client 1 trained none) -> unchanged
    assert torch.equal(new[H][1], clients[0][H][1])
    assert torch.equal(new[H][0], g[H][0])
    new, m = aggregate("hetlora", lora(), [lora(seed=1)], [1.0], [{"rank": np.int32(R)}])
    assert m["rejected"] == []


def test_a_rule_failing_on_one_client_loses_that_client_not_the_round():
    """The safety net behind validation: a client on which the rule raises is isolated and
    rejected; if every client fails alone the fault is not theirs and the error is raised."""
    marker = 123.0

    def fragile(global_state, client_states, weights, metas):
        if any(float(cs["head.weight"][0, 0]) == marker for cs in client_states):
            raise IndexError("planted fault")
        return fedit.METHOD.aggregate(global_state, client_states, weights, metas)

    fm.register(dataclasses.replace(fedit.METHOD, name="fragile", aggregate=fragile))
    try:
        g, clients = lora(), [lora(seed=s) for s in (1, 2, 3)]
        clients[2]["head.weight"][0, 0] = marker
        _, m = aggregate("fragile", g, clients, [1.0, 1.0, 1.0])
        assert m["used"] == [0, 1]
        assert m["rejected"][0]["client"] == 2 and "planted fault" in m["rejected"][0]["reason"]
        for c in clients[:2]:
            c["head.weight"][0, 0] = marker
        with pytest.raises(IndexError, match="planted"):
            aggregate("fragile", g, clients, [1.0, 1.0, 1.0])
    finally:
        fm.unregister("fragile")


# ------------------------------------------------------------------------------ overflow
@pytest.mark.parametrize("weights", [[1e308, 1e308, 5e307], [1e-300, 1e-300, 5e-301]])
@pytest.mark.parametrize("method", ["fedit", "hetlora", "prelort", "hafl", "flexlora", "florana"])
def test_extreme_weights_give_the_same_result_as_moderate_ones(method, weights):
    g, clients = lora(), [lora(seed=s) for s in (1, 2, 3)]
    want, _ = aggregate(method, g, clients, [2.0, 2.0, 1.0])
    got, m = aggregate(method, g, clients, weights)
    assert m["weights"] == pytest.approx([0.4, 0.4, 0.2])
    for k in want:
        assert bool(torch.isfinite(got[k]).all()), k
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["fedit", "hetlora", "prelort", "hafl"])
def test_streaming_with_extreme_weights_equals_batch(method):
    g, clients = lora(), [lora(seed=s) for s in (1, 2, 3)]
    for weights in ([1e39, 1.0, 3e38], [1e308, 1e308, 1.0], [1e-300, 1.0, 1e-30]):
        want, _ = aggregate(method, g, clients, weights)
        agg = Aggregator(method, g)
        for c, w in zip(clients, weights, strict=True):
            assert agg.add(c, w)
        got, _ = agg.result()
        for k in want:
            assert bool(torch.isfinite(got[k]).all()), (weights, k)
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


def test_a_lone_contributor_with_a_tiny_weight_is_taken_whole():
    """PreLort's component 2 is held by client 1 alone, whose weight is 1e-290 of client 0's:
    the component must be client 1's value, in batch and streaming alike."""
    g = lora()
    small, full = lora(rank=2, seed=1, scale=1e-30), lora(seed=2)
    weights = [1.0, 1e-290]
    new, _ = aggregate("prelort", g, [small, full], weights)
    agg = Aggregator("prelort", g)
    agg.add(small, weights[0])
    agg.add(full, weights[1])
    streamed, _ = agg.result()
    for out in (new, streamed):
        for p in PATHS:
            torch.testing.assert_close(out[f"{p}.lora_A.weight"][2], full[f"{p}.lora_A.weight"][2])


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_hetlora_sparsity_weights_survive_tiny_and_huge_updates(scale):
    """‖B A‖ of factors ~1e-30 underflows float32 and of ~1e30 overflows it; the weights are
    scale-free, so scaling every client by the same factor scales the result by it."""
    g = lora()
    clients = [lora(seed=s) for s in (1, 2, 3)]
    want, wm = aggregate("hetlora", g, clients, [1.0, 1.0, 1.0])
    scaled = [{k: v * scale for k, v in c.items()} for c in clients]
    got, m = aggregate("hetlora", g, scaled, [1.0, 1.0, 1.0])
    assert m["rejected"] == []
    for p in PATHS:
        assert m["hetlora_weights"][p] == pytest.approx(wm["hetlora_weights"][p], rel=1e-5)
    for k in want:
        assert bool(torch.isfinite(got[k]).all()), k
        torch.testing.assert_close(got[k].double() / scale, want[k].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [3e19, 1e30, 3e38])
def test_huge_finite_clients_are_accepted_and_averaged(value):
    """Values whose float32 norm overflows (>= ~2e19) are finite: accepted, and averaged
    without overflow even near the float32 maximum."""
    g = lora()
    clients = [lora(seed=s) for s in (1, 2)]
    key = f"{PATHS[0]}.lora_B.weight"
    for c in clients:
        c[key] = torch.full_like(c[key], value)
        c[key][0, 0] = -value
    new, m = aggregate("fedit", g, clients, [1.0, 3.0])
    assert m["rejected"] == [] and m["used"] == [0, 1]
    assert bool(torch.isfinite(new[key]).all())
    torch.testing.assert_close(
        new[key].double(), mean64(clients, [1.0, 3.0], key), rtol=1e-6, atol=0
    )
    agg = Aggregator("fedit", g)
    for c, w in zip(clients, [1.0, 3.0], strict=True):
        assert agg.add(c, w)
    streamed, _ = agg.result()
    torch.testing.assert_close(streamed[key], new[key], rtol=1e-6, atol=0)
    nan = dict(clients[1], **{key: clients[1][key].clone()})
    nan[key][1, 1] = math.inf
    _, m = aggregate("fedit", g, [clients[0], nan], [1.0, 1.0])
    assert m["rejected"] == [{"client": 1, "key": key, "reason": "contains NaN/inf"}]


def test_florana_fit_never_pushes_finite_factors_past_float32():
    """FLoRA-NA's fitted coefficients are unconstrained: near the float32 maximum they can
    overflow the combined factor. That layer then falls back to FedIT's convex combination
    (reported in ``florana_fallback``), so the result stays finite."""
    fallbacks = 0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        g = {
            "m.lora_A.weight": torch.randn(1, 1, generator=gen),
            "m.lora_B.weight": torch.randn(1, 1, generator=gen),
        }
        clients = [{k: torch.randn(v.shape, generator=gen) for k, v in g.items()} for _ in range(2)]
        clients[0]["m.lora_B.weight"] = torch.full((1, 1), 3e38 * (-1) ** seed)
        new, m = aggregate("florana", g, clients, [1.0, 1.0])
        assert all(bool(torch.isfinite(t).all()) for t in new.values()), seed
        if m["florana_fallback"]:
            fallbacks += 1
            fedit, _ = aggregate("fedit", g, clients, [1.0, 1.0])
            for k in fedit:
                torch.testing.assert_close(new[k], fedit[k], rtol=1e-6, atol=0)
    assert fallbacks > 0  # the case does arise: without the fallback these results were -inf


# ------------------------------------------------------------------------------ Flower
flwr = pytest.importorskip("flwr")


def test_flower_strategy_names_one_bad_meta_and_aggregates_the_rest():
    from test_flower import node_of, run_round, strategy

    g = ravan(0)
    clients = [ravan(s) for s in (1, 2, 3)]
    metas = [{"heads": {PATHS[0]: [0]}}, {"heads": {PATHS[0]: [7]}}, {}]
    uploads = {k: (clients[k], 10 * (k + 1), metas[k]) for k in range(3)}
    st = strategy("ravan", 3)
    got, metrics, replies = run_round(st, g, uploads)
    assert metrics["aggregation_failed"] == 0
    assert metrics["rejected"] == [node_of(1)] and metrics["num_rejected"] == 1
    assert metrics["clients_used"] == 2
    ((nid, why),) = st.last_rejections
    assert nid == node_of(1) and "heads" in why and "[0, 3)" in why
    order = [int(m.metadata.src_node_id) - 1 for m in replies if int(m.metadata.src_node_id) != 2]
    want, _ = aggregate(
        "ravan",
        g,
        [clients[k] for k in order],
        [10 * (k + 1) for k in order],
        [metas[k] for k in order],
    )
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


def test_flower_strategy_counts_a_none_reply_instead_of_raising():
    from flwr.app import ConfigRecord
    from test_flower import lora_state, node_of, scripted_app, strategy

    from fedlora import flower as ff

    g = lora_state()
    uploads = {0: (lora_state(seed=1), 10, {}), 1: (lora_state(seed=2), 30, {})}
    st = strategy("fedit", 2)
    grid = ff.LocalGrid(scripted_app(uploads), 2)
    messages = st.configure_train(1, ff.to_arrayrecord(g), ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages))
    arrays, metrics = st.aggregate_train(1, [*replies, None])
    assert arrays is not None and metrics["aggregation_failed"] == 0
    assert metrics["num_rejected"] == 1 and metrics["clients_used"] == 2
    assert sorted(metrics["used"]) == [node_of(0), node_of(1)]
    assert any("not a reply" in why for _, why in st.last_rejections)
