"""fedlora.aggregate / Aggregator: every method's invariants (DESIGN §4, §7) and bad input.

Oracles are dense float64 products ``B A`` on small odd shapes, formed in the tests only.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import DEVICES

import fedlora
from fedlora.aggregation import METHODS, STREAMING_METHODS, Aggregator
from fedlora.aggregation import aggregate as _aggregate
from fedlora.methods import flexlora, hafl


def aggregate(*args, **kwargs):
    """``fedlora.aggregate`` with the aggregation error on: these tests check it too."""
    kwargs.setdefault("error", True)
    return _aggregate(*args, **kwargs)


PATHS = ("enc.0.q", "enc.1.v")
D_IN, D_OUT, R = 13, 11, 5


def A(p):
    return f"{p}.lora_A.weight"


def B(p):
    return f"{p}.lora_B.weight"


def make_state(ranks=R, device="cpu", head=True):
    """Random PEFT-style state: LoRA pairs of rank ``ranks`` (int or per path) + a head."""
    state = {}
    for i, p in enumerate(PATHS):
        r = ranks if isinstance(ranks, int) else ranks[i]
        state[A(p)] = torch.randn(r, D_IN, device=device) / 3 + 0.01
        state[B(p)] = torch.randn(D_OUT, r, device=device) / 3 + 0.01
    if head:
        state["classifier.weight"] = torch.randn(3, D_OUT, device=device)
        state["classifier.bias"] = torch.randn(3, device=device)
    return state


def dense(B_, A_):
    return B_.double() @ A_.double()


def ideal(clients, p, path):
    return sum(w * dense(c[B(path)], c[A(path)]) for c, w in zip(clients, p, strict=True))


def norm_w(w):
    t = sum(w)
    return [x / t for x in w]


def dense_error(new, clients, p, extra_terms=()):
    num = den = 0.0
    for path in PATHS:
        ide = ideal(clients, p, path)
        glob = dense(new[B(path)], new[A(path)])
        for bk, ak in extra_terms:
            glob = glob + dense(new[f"{path}.{bk}"], new[f"{path}.{ak}"])
        num += float((ide - glob).square().sum())
        den += float(ide.square().sum())
    return math.sqrt(num / den)


@pytest.fixture
def round3():
    g = make_state()
    clients = [make_state() for _ in range(3)]
    return g, clients, [3.0, 1.0, 2.0]


# ------------------------------------------------------------------------------------- FedIT & co


def test_fedit_averages_every_key_and_reports_its_inexactness(round3):
    g, clients, w = round3
    new, m = aggregate("fedit", g, clients, w)
    p = norm_w(w)
    for key in g:
        exp = sum(pk * c[key].double() for c, pk in zip(clients, p, strict=True))
        torch.testing.assert_close(new[key].double(), exp, atol=1e-6, rtol=1e-6)
    assert m["aggregation_error"] == pytest.approx(dense_error(new, clients, p), rel=1e-6)
    assert m["aggregation_error"] > 0.05  # B_g A_g != Σ p B A on random factors
    assert m["clients_used"] == 3 and m["used"] == [0, 1, 2] and m["rejected"] == []
    assert m["weights"] == pytest.approx(p)
    assert m["bytes_uploaded"] == sum(t.numel() * 4 for c in clients for t in c.values())
    assert set(m["aggregation_error_per_layer"]) == set(PATHS)


def test_ffa_is_exact_and_keeps_a(round3):
    g, clients, w = round3
    ups = [
        {k: (g[k].clone() if k.endswith("lora_A.weight") else v) for k, v in c.items()}
        for c in clients
    ]
    ups[1] = {k: v for k, v in ups[1].items() if not k.endswith("lora_A.weight")}  # A omitted
    new, m = aggregate("ffa", g, ups, w)
    assert m["rejected"] == [] and m["aggregation_error"] < 1e-6
    for p in PATHS:
        assert torch.equal(new[A(p)], g[A(p)])
    p = norm_w(w)
    exp = sum(pk * c[B(PATHS[0])] for c, pk in zip(clients, p, strict=True))
    torch.testing.assert_close(new[B(PATHS[0])], exp)


def test_ffa_rejects_a_client_that_changed_a(round3):
    g, clients, w = round3
    ups = [
        {k: (g[k].clone() if k.endswith("lora_A.weight") else v) for k, v in c.items()}
        for c in clients
    ]
    ups[2][A(PATHS[1])] = ups[2][A(PATHS[1])] + 1e-3
    _, m = aggregate("ffa", g, ups, w)
    assert m["used"] == [0, 1]
    assert m["rejected"][0]["client"] == 2 and m["rejected"][0]["key"] == A(PATHS[1])


def test_fedex_residual_makes_it_exact(round3):
    g, clients, w = round3
    new, m = aggregate("fedex", g, clients, w)
    p = norm_w(w)
    fedit, _ = aggregate("fedit", g, clients, w, error=False)
    for path in PATHS:
        torch.testing.assert_close(new[A(path)], fedit[A(path)])
        res_B, res_A = new[f"{path}.lora_residual_B"], new[f"{path}.lora_residual_A"]
        assert res_B.shape == (D_OUT, 4 * R) and res_A.shape == (4 * R, D_IN)
        total = dense(new[B(path)], new[A(path)]) + dense(res_B, res_A)
        torch.testing.assert_close(total, ideal(clients, p, path), atol=1e-5, rtol=1e-5)
    assert m["aggregation_error"] < 1e-6


def test_flora_stacks_exactly_and_restarts_the_adapter():
    g = make_state()
    clients = [make_state(ranks=r) for r in (2, 5, 3)]  # heterogeneous ranks stack too
    w = [1.0, 2.0, 5.0]
    new, m = aggregate("flora", g, clients, w, seed=3)
    p = norm_w(w)
    assert m["aggregation_error"] < 1e-6
    for path in PATHS:
        mB, mA = new[f"{path}.lora_merge_B"], new[f"{path}.lora_merge_A"]
        assert mB.shape == (D_OUT, 10) and mA.shape == (10, D_IN)
        torch.testing.assert_close(dense(mB, mA), ideal(clients, p, path), atol=1e-5, rtol=1e-5)
        assert torch.equal(new[B(path)], torch.zeros(D_OUT, R))
        assert new[A(path)].shape == (R, D_IN)
        assert new[A(path)].abs().max() <= 1 / D_IN**0.5 and new[A(path)].std() > 0
    again, _ = aggregate("flora", g, clients, w, seed=3)
    assert torch.equal(again[A(PATHS[0])], new[A(PATHS[0])])
    keep, _ = aggregate("flora", g, clients, w, seed=None)
    assert torch.equal(keep[A(PATHS[0])], g[A(PATHS[0])])
    # the returned state goes back in as the next global: merge keys are ignored on input
    nxt, m2 = aggregate("flora", new, [make_state() for _ in range(2)], [1, 1])
    assert m2["rejected"] == [] and nxt[f"{PATHS[0]}.lora_merge_B"].shape == (D_OUT, 2 * R)


# ---------------------------------------------------------------------- zero-padding vs masked


def test_zero_padding_shrinks_a_lone_contributor_while_prelort_takes_it_whole():
    g = make_state()
    clients = [make_state(ranks=R), make_state(ranks=2)]  # only client 0 holds components 2..4
    w = [1.0, 3.0]
    p0 = 0.25
    het, _ = aggregate("hetlora", g, clients, w, weighting="data")
    pre, _ = aggregate("prelort", g, clients, w)
    for path in PATHS:
        A0, B0 = clients[0][A(path)], clients[0][B(path)]
        torch.testing.assert_close(het[A(path)][2:], p0 * A0[2:])
        torch.testing.assert_close(het[B(path)][:, 2:], p0 * B0[:, 2:])
        assert torch.equal(pre[A(path)][2:], A0[2:])
        assert torch.equal(pre[B(path)][:, 2:], B0[:, 2:])
        both = 0.25 * A0[:2] + 0.75 * clients[1][A(path)]
        torch.testing.assert_close(het[A(path)][:2], both)
        torch.testing.assert_close(pre[A(path)][:2], both)


def test_hafl_takes_a_lone_contributor_whole_and_leaves_untouched_components():
    g = make_state()
    clients = [make_state(), make_state()]
    metas = [
        {"updated": {PATHS[0]: [0, 3], PATHS[1]: [1]}},
        {"updated": {PATHS[0]: [0, 1], PATHS[1]: []}},
    ]
    new, m = aggregate("hafl", g, clients, [1.0, 3.0], metas)
    path = PATHS[0]
    c0, c1 = clients
    torch.testing.assert_close(new[A(path)][0], 0.25 * c0[A(path)][0] + 0.75 * c1[A(path)][0])
    assert torch.equal(new[A(path)][3], c0[A(path)][3])  # lone contributor, whole
    assert torch.equal(new[B(path)][:, 3], c0[B(path)][:, 3])
    torch.testing.assert_close(new[A(path)][1], c1[A(path)][1], atol=0, rtol=2e-7)  # (0.75x)/0.75
    for j in (2, 4):  # nobody updated: unchanged, bitwise
        assert torch.equal(new[A(path)][j], g[A(path)][j])
        assert torch.equal(new[B(path)][:, j], g[B(path)][:, j])
    assert m["hafl_updates"][path] == [2, 1, 0, 1, 0]
    other = PATHS[1]
    assert torch.equal(new[A(other)][1], c0[A(other)][1])
    assert torch.equal(new[A(other)][[0, 2, 3, 4]], g[A(other)][[0, 2, 3, 4]])
    # zero-padding the same participation would shrink component 3 by client 0's weight 0.25
    assert not torch.allclose(new[A(path)][3], 0.25 * c0[A(path)][3])


def test_hafl_truncation_mode_writes_back_to_indices_and_averages_scores():
    g = make_state()
    full = make_state()
    small = {k: v for k, v in make_state(ranks=2).items()}
    metas = [
        {"scores": {PATHS[0]: list(range(R)), PATHS[1]: torch.ones(R)}},
        {
            "indices": {PATHS[0]: [4, 1], PATHS[1]: [0, 2]},
            "scores": {PATHS[0]: torch.tensor([10.0, 20.0])},
        },
    ]
    new, m = aggregate("hafl", g, [full, small], [1.0, 1.0], metas)
    path = PATHS[0]
    # index 4 <- mean of full[4] and small row 0; index 1 <- mean of full[1] and small row 1
    torch.testing.assert_close(new[A(path)][4], (full[A(path)][4] + small[A(path)][0]) / 2)
    torch.testing.assert_close(new[B(path)][:, 1], (full[B(path)][:, 1] + small[B(path)][:, 1]) / 2)
    torch.testing.assert_close(new[A(path)][0], full[A(path)][0])
    torch.testing.assert_close(m["scores"][path], torch.tensor([0.0, 10.5, 2.0, 3.0, 7.0]))
    assert torch.equal(m["scores"][PATHS[1]], torch.ones(R))
    # the client side picks the top components by these scores and uploads them back in place
    down, indices = hafl.truncation_download(new, m["scores"], 2)
    assert indices[path] == [1, 4]
    assert torch.equal(down[A(path)], new[A(path)][[1, 4]])
    assert torch.equal(down[B(path)], new[B(path)][:, [1, 4]])
    state, meta = hafl.truncation_upload(down, indices)
    again, m2 = aggregate("hafl", new, [state], [1.0], [meta])
    assert m2["rejected"] == [] and torch.equal(again[A(path)], new[A(path)])


def test_prelort_leaves_uncovered_components_unchanged_and_reduces_to_fedit():
    g = make_state()
    clients = [make_state(ranks=r) for r in (1, 3, 2)]
    new, m = aggregate("prelort", g, clients, [1, 1, 1], [{"rank": 1}, {"rank": 3}, {}])
    for path in PATHS:
        assert torch.equal(new[A(path)][3:], g[A(path)][3:])
        assert torch.equal(new[B(path)][:, 3:], g[B(path)][:, 3:])
        torch.testing.assert_close(new[A(path)][2], clients[1][A(path)][2], atol=0, rtol=2e-7)
    assert m["prelort_coverage"][PATHS[0]] == [3, 2, 1, 0, 0]
    same = [make_state() for _ in range(3)]
    a, _ = aggregate("prelort", g, same, [1.0, 2.0, 4.0])
    b, _ = aggregate("fedit", g, same, [1.0, 2.0, 4.0])
    for key in g:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)


def test_hetlora_sparsity_weights_follow_the_update_norms():
    g = make_state()
    clients = [make_state(ranks=r) for r in (5, 3)]
    clients[1] = {
        k: v * 3 if k.endswith("weight") and "lora" in k else v for k, v in clients[1].items()
    }
    new, m = aggregate("hetlora", g, clients, [1.0, 1.0])
    path = PATHS[0]
    norms = [float(dense(c[B(path)], c[A(path)]).norm()) for c in clients]
    w = norm_w(norms)
    assert m["hetlora_weights"][path] == pytest.approx(w, rel=1e-6)
    exp = w[0] * clients[0][A(path)].clone()
    exp[:3] += w[1] * clients[1][A(path)]
    torch.testing.assert_close(new[A(path)], exp)


# ----------------------------------------------------------------------------------- FlexLoRA


def test_flexlora_matches_a_dense_svd_and_gives_clients_their_best_rank():
    g = make_state()
    clients = [make_state(ranks=r) for r in (3, 4, 2)]  # Σ r_k = 9 > R: truncation happens
    w = [1.0, 2.0, 3.0]
    p = norm_w(w)
    new, m = aggregate("flexlora", g, clients, w)
    for path in PATHS:
        dw = ideal(clients, p, path)
        U, S, Vh = torch.linalg.svd(dw)
        best = (U[:, :R] * S[:R]) @ Vh[:R]
        got = dense(new[B(path)], new[A(path)])
        torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-5)
        # balanced factors: BᵀB = AAᵀ = Σ_R
        torch.testing.assert_close(
            new[B(path)].double().T @ new[B(path)].double(), torch.diag(S[:R]), atol=1e-5, rtol=1e-5
        )
        assert m["flexlora_energy"][path] == pytest.approx(
            float(S[:R].square().sum() / S.square().sum())
        )
        tail = float(S[R:].square().sum() / S.square().sum()) ** 0.5
        assert m["aggregation_error_per_layer"][path] == pytest.approx(tail, rel=1e-4)
        down = flexlora.client_factors(new, {PATHS[0]: 2, PATHS[1]: 3})
        r = 2 if path == PATHS[0] else 3
        assert down[A(path)].shape == (r, D_IN)
        torch.testing.assert_close(
            dense(down[B(path)], down[A(path)]), (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-5, rtol=1e-5
        )
    _, m2 = aggregate("flexlora", g, [make_state(ranks=2), make_state(ranks=3)], [1, 1])
    assert m2["aggregation_error"] < 1e-6  # Σ r_k ≤ R: exact
    with pytest.raises(ValueError, match="rank for"):
        flexlora.client_factors(new, R + 1)


# ----------------------------------------------------------------------------------- FLoRA-NA


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_florana_never_above_fedit(shared, seed):
    torch.manual_seed(seed)
    g = make_state()
    clients = [make_state() for _ in range(4)]
    w = [1.0, 2.0, 3.0, 4.0]
    _, mf = aggregate("fedit", g, clients, w)
    na, mn = aggregate("florana", g, clients, w, shared=shared)
    assert mn["aggregation_error"] <= mf["aggregation_error"] + 1e-6
    assert mn["fedit_error"] == pytest.approx(mf["aggregation_error"], rel=1e-5)
    assert mn["florana_fit_error"] == pytest.approx(mn["aggregation_error"], rel=1e-4, abs=1e-7)
    assert mn["aggregation_error"] < 0.95 * mf["aggregation_error"]  # it does improve here
    # the applied update is the delta form with the reported coefficients
    p = norm_w(w)
    path = PATHS[1]
    alpha = mn["florana_alpha"][path]
    exp = g[A(path)].double() + sum(
        a * pk * (c[A(path)].double() - g[A(path)].double())
        for a, pk, c in zip(alpha, p, clients, strict=True)
    )
    torch.testing.assert_close(na[A(path)].double(), exp, atol=1e-5, rtol=1e-5)
    if shared:
        assert mn["florana_alpha"][PATHS[0]] == mn["florana_alpha"][PATHS[1]]
    else:
        assert mn["florana_alpha"][PATHS[0]] != mn["florana_alpha"][PATHS[1]]


def test_florana_zero_iterations_is_fedit(round3):
    g, clients, w = round3
    na, mn = aggregate("florana", g, clients, w, iters=0)
    fa, mf = aggregate("fedit", g, clients, w)
    for key in g:
        torch.testing.assert_close(na[key], fa[key], atol=1e-6, rtol=1e-6)
    assert mn["aggregation_error"] == pytest.approx(mf["aggregation_error"], rel=1e-5)


# ---------------------------------------------------------------------------------- streaming


STREAM_CASES = [
    ("fedit", {}, lambda: [make_state() for _ in range(4)], None),
    ("ffa", {}, None, None),
    ("hetlora", {}, lambda: [make_state(ranks=r) for r in (5, 2, 4, 1)], None),
    ("hetlora", {"weighting": "data"}, lambda: [make_state(ranks=r) for r in (5, 2, 4, 1)], None),
    ("prelort", {}, lambda: [make_state(ranks=r) for r in (3, 2, 1, 3)], None),
    (
        "hafl",
        {},
        lambda: [make_state(), make_state(ranks=2), make_state(), make_state()],
        [
            {"updated": {PATHS[0]: [0, 2]}, "scores": {PATHS[0]: torch.rand(R)}},
            {"indices": {PATHS[0]: [3, 0], PATHS[1]: [1, 2]}},
            {"updated": {PATHS[0]: [], PATHS[1]: [4]}},
            {},
        ],
    ),
]


@pytest.mark.parametrize(
    "method,options,make,metas", STREAM_CASES, ids=[c[0] + str(c[1]) for c in STREAM_CASES]
)
def test_streaming_equals_batch(method, options, make, metas):
    g = make_state()
    if method == "ffa":
        states = [make_state() for _ in range(4)]
        states = [
            {k: (g[k] if k.endswith("lora_A.weight") else v) for k, v in s.items()} for s in states
        ]
    else:
        states = make()
    metas = metas or [{}] * len(states)
    w = [2.0, 1.0, 0.5, 3.0]
    batch, mb = aggregate(method, g, states, w, metas, **options)
    agg = Aggregator(method, g, error=True, **options)
    for s, wk, meta in zip(states, w, metas, strict=True):
        assert agg.add(s, wk, meta)
    stream, ms = agg.result()
    assert set(stream) == set(batch)
    for key in batch:
        torch.testing.assert_close(stream[key], batch[key], atol=1e-6, rtol=1e-6)
    assert ms["aggregation_error"] == pytest.approx(mb["aggregation_error"], rel=1e-5, abs=1e-6)
    assert ms["clients_used"] == 4 and ms["weights"] == pytest.approx(mb["weights"])
    assert ms["bytes_uploaded"] == mb["bytes_uploaded"]
    for k in ("hafl_updates", "scores"):
        if k in mb:
            assert (
                str(ms[k]) == str(mb[k])
                if k != "scores"
                else all(torch.allclose(ms[k][p], mb[k][p]) for p in mb[k])
            )


def test_streaming_rejects_and_refuses_non_streaming_methods():
    g = make_state()
    agg = Aggregator("fedit", g)
    bad = make_state()
    bad[A(PATHS[0])][0, 0] = float("inf")
    good = make_state()
    assert agg.add(good, 1.0) and not agg.add(bad, 1.0)
    new, m = agg.result()
    assert m["rejected"] == [{"client": 1, "key": A(PATHS[0]), "reason": "contains NaN/inf"}]
    assert math.isnan(m["aggregation_error"])  # error off by default when streaming
    for key in g:
        torch.testing.assert_close(new[key], good[key])
    with pytest.raises(ValueError, match="weight must be finite"):
        agg.add(good, -1.0)
    with pytest.raises(ValueError, match="cannot stream"):
        Aggregator("flexlora", g)
    assert set(STREAMING_METHODS) == {"fedit", "ffa", "hetlora", "prelort", "hafl"}
    with pytest.warns(UserWarning, match="unchanged"):
        same, m0 = Aggregator("prelort", g).result()
    assert all(torch.equal(same[k], g[k]) for k in g) and m0["clients_used"] == 0


# ---------------------------------------------------------------------------------- bad input


def good_of(clients, w, bad_index):
    keep = [i for i in range(len(clients)) if i != bad_index]
    return [clients[i] for i in keep], [w[i] for i in keep]


def corrupt(kind, g, state):
    s = dict(state)
    path = PATHS[1]
    if kind == "nan":
        s[B(path)] = s[B(path)].clone()
        s[B(path)][2, 1] = float("nan")
        return s, B(path), "NaN/inf"
    if kind == "inf_head":
        s["classifier.bias"] = torch.full((3,), float("-inf"))
        return s, "classifier.bias", "NaN/inf"
    if kind == "missing":
        del s["classifier.weight"]
        return s, "classifier.weight", "missing key"
    if kind == "extra":
        s["enc.9.q.lora_A.weight"] = torch.randn(R, D_IN)
        return s, "enc.9.q.lora_A.weight", "unexpected key"
    if kind == "a_without_b":
        del s[B(path)]
        return s, B(path), "missing key"
    if kind == "shape":
        s[A(path)] = torch.randn(R, D_IN + 1)
        return s, A(path), "shape"
    if kind == "dtype":
        s[A(path)] = torch.ones(R, D_IN, dtype=torch.int64)
        return s, A(path), "floating-point"
    if kind == "not_a_dict":
        return [1, 2], None, "dict"
    raise ValueError(kind)


KINDS = ["nan", "inf_head", "missing", "extra", "a_without_b", "shape", "dtype", "not_a_dict"]


@pytest.mark.parametrize("method", ["fedit", "fedex", "flora", "prelort", "florana", "flexlora"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_client_is_rejected_named_and_the_others_aggregated(method, kind, round3):
    g, clients, w = round3
    clients = [*clients, make_state()]
    w = [*w, 1.5]
    bad, key, reason = corrupt(kind, g, clients[1])
    sent = [clients[0], bad, clients[2], clients[3]]
    snapshot = copy.deepcopy(sent), copy.deepcopy(g)
    new, m = aggregate(method, g, sent, w)
    assert m["rejected"] == [{"client": 1, "key": key, "reason": m["rejected"][0]["reason"]}]
    assert reason in m["rejected"][0]["reason"]
    assert m["used"] == [0, 2, 3] and m["clients_used"] == 3
    assert all(torch.isfinite(v).all() for v in new.values())
    exp, _ = aggregate(method, g, *good_of(clients, w, 1), error=False)
    for k in g:
        torch.testing.assert_close(new[k], exp[k])
    # nothing the caller passed was modified
    for before, after in zip(snapshot[0], sent, strict=True):
        if isinstance(before, dict):
            assert before.keys() == after.keys()
            for k in before:
                torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)
    assert all(torch.equal(snapshot[1][k], g[k]) for k in g)
    with pytest.raises(ValueError, match=r"client_states\[1\] rejected"):
        aggregate(method, g, sent, w, strict=True)


@pytest.mark.parametrize("method", ["hetlora", "prelort", "flexlora", "flora", "hafl"])
def test_rank_shape_checks_for_ragged_methods(method):
    g = make_state()
    good = make_state(ranks=3)
    too_big = make_state(ranks=R + 1)
    mismatched = make_state(ranks=3)
    mismatched[B(PATHS[0])] = torch.randn(D_OUT, 2)
    metas = [{"rank": 3, "indices": {p: [0, 1, 2] for p in PATHS}}] * 3
    if method != "hafl":
        metas = [{"rank": 3}, {}, {}]
    _, m = aggregate(method, g, [good, too_big, mismatched], [1, 1, 1], metas)
    assert [r["client"] for r in m["rejected"]] == [1, 2]
    assert m["rejected"][0]["key"] == A(PATHS[0]) and "r_k <= 5" in m["rejected"][0]["reason"]
    assert m["rejected"][1]["key"] == B(PATHS[0])
    if method != "hafl":
        _, m2 = aggregate(
            method, g, [good, make_state(ranks=2)], [1, 1], [{"rank": 3}, {"rank": {PATHS[0]: 4}}]
        )
        assert m2["rejected"][0]["client"] == 1 and "declares rank 4" in m2["rejected"][0]["reason"]


@pytest.mark.parametrize("method", ["fedit", "fedex", "florana", "ffa"])
def test_equal_rank_methods_reject_a_smaller_rank(method):
    g = make_state()
    clients = [make_state(), make_state(ranks=3)]
    if method == "ffa":
        clients[0] = {**clients[0], **{A(p): g[A(p)] for p in PATHS}}
    _, m = aggregate(method, g, clients, [1, 1])
    assert m["rejected"][0]["client"] == 1 and "shape" in m["rejected"][0]["reason"]


@pytest.mark.parametrize(
    "meta,reason",
    [
        ({"updated": {PATHS[0]: [0, 7]}}, "ints in [0, 5)"),
        ({"updated": {PATHS[0]: [1, 1]}}, "repeated"),
        ({"updated": [0]}, "must be a {path"),
        ({"scores": {PATHS[0]: [1.0, 2.0]}}, "shape [5]"),
        ({"scores": {PATHS[0]: [float("nan")] * R}}, "NaN"),
    ],
)
def test_hafl_bad_meta_is_rejected(meta, reason):
    g = make_state()
    _, m = aggregate("hafl", g, [make_state(), make_state()], [1, 1], [meta, {}])
    assert m["used"] == [1] and reason in m["rejected"][0]["reason"]
    small = make_state(ranks=2)
    _, m = aggregate("hafl", g, [make_state(), small], [1, 1], [{}, {"updated": {PATHS[0]: [0]}}])
    assert "needs meta 'indices'" in m["rejected"][0]["reason"]
    _, m = aggregate(
        "hafl",
        g,
        [make_state(), small],
        [1, 1],
        [{}, {"indices": {p: [0, 4] for p in PATHS}, "updated": {PATHS[0]: [1]}}],
    )
    assert "not uploaded" in m["rejected"][0]["reason"]


def test_every_client_rejected_leaves_the_global_unchanged(round3):
    g, clients, w = round3
    bad = [corrupt("nan", g, c)[0] for c in clients]
    with pytest.warns(UserWarning, match="unchanged"):
        new, m = aggregate("prelort", g, bad, w)
    assert m["clients_used"] == 0 and len(m["rejected"]) == 3
    for k in g:
        assert torch.equal(new[k], g[k]) and new[k].data_ptr() != g[k].data_ptr()


@pytest.mark.parametrize(
    "weights,exc,match",
    [
        ([1.0, -1.0, 1.0], ValueError, r"weights\[1\] must be finite and non-negative"),
        ([1.0, float("nan"), 1.0], ValueError, r"weights\[1\]"),
        ([0, 0, 0], ValueError, "all zero"),
        ([1.0, 1.0], ValueError, r"one entry per client \(C=3\)"),
        ([1.0, "a", 1.0], TypeError, r"weights\[1\] must be a number"),
        (torch.ones(3, 1), ValueError, "weights must be 1-D"),
        ("abc", TypeError, "weights must be a sequence"),
    ],
)
def test_bad_weights_raise(weights, exc, match, round3):
    g, clients, _ = round3
    with pytest.raises(exc, match=match):
        aggregate("fedit", g, clients, weights)


def test_bad_global_and_call_raise(round3):
    g, clients, w = round3
    no_b = {k: v for k, v in g.items() if k != B(PATHS[0])}
    with pytest.raises(ValueError, match=r"'enc\.0\.q\.lora_A\.weight' without its lora_B"):
        aggregate("fedit", no_b, clients, w)
    nan = dict(g)
    nan["classifier.bias"] = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match=r"global_state\['classifier\.bias'\] contains NaN"):
        aggregate("fedit", nan, clients, w)
    bad_rank = dict(g)
    bad_rank[B(PATHS[0])] = torch.randn(D_OUT, R + 1)
    with pytest.raises(ValueError, match=r"global_state\['enc\.0\.q\.lora_B\.weight'\] must be"):
        aggregate("fedit", bad_rank, clients, w)
    with pytest.raises(TypeError, match="global_state must be a dict"):
        aggregate("fedit", [g], clients, w)
    with pytest.raises(TypeError, match=r"global_state\['x'\] must be a floating-point tensor"):
        aggregate("fedit", {**g, "x": 3}, clients, w)
    with pytest.raises(ValueError, match="method must be one of"):
        aggregate("fedavg", g, clients, w)
    with pytest.raises(TypeError, match="unknown option 'shared' for method 'fedit'"):
        aggregate("fedit", g, clients, w, shared=True)
    with pytest.raises(ValueError, match="weighting must be one of"):
        aggregate("hetlora", g, clients, w, weighting="norm")
    with pytest.raises(ValueError, match=r"metas must have one entry per client \(C=3\)"):
        aggregate("fedit", g, clients, w, [{}])
    with pytest.raises(TypeError, match="client_states must be a list"):
        aggregate("fedit", g, clients[0], w)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ravan"])
def test_inputs_untouched_and_outputs_own_their_storage(method):
    g = make_state()
    ranks = {"hetlora": 3, "prelort": 3, "flexlora": 3, "flora": 3}.get(method, R)
    clients = [make_state(), make_state(ranks=ranks)]
    if method == "ffa":
        clients = [
            {k: (g[k].clone() if k.endswith("lora_A.weight") else v) for k, v in c.items()}
            for c in clients
        ]
    metas = [{"updated": {PATHS[0]: [0]}}, {}] if method == "hafl" else None
    before = copy.deepcopy((g, clients))
    new, m = aggregate(method, g, clients, [1.0, 2.0], metas)
    assert m["rejected"] == [] and math.isfinite(m["aggregation_error"])
    for b, a in zip((before[0], *before[1]), (g, *clients), strict=True):
        assert b.keys() == a.keys() and all(torch.equal(b[k], a[k]) for k in b)
    inputs = {t.untyped_storage().data_ptr() for s in (g, *clients) for t in s.values()}
    assert not any(t.untyped_storage().data_ptr() in inputs for t in new.values())
    for path in PATHS:
        assert new[A(path)].dtype == torch.float32


def test_mixed_dtype_clients_follow_the_global_dtype(round3):
    g, clients, w = round3
    clients = [{k: v.to(torch.bfloat16) for k, v in clients[0].items()}, clients[1], clients[2]]
    new, m = aggregate("fedit", g, clients, w)
    assert m["rejected"] == [] and all(v.dtype == torch.float32 for v in new.values())


def test_public_exports():
    assert fedlora.aggregate is _aggregate and fedlora.Aggregator is Aggregator


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fedit", "prelort", "hafl", "flexlora", "florana"])
def test_runs_on_every_device(device, method):
    g = make_state(device=device)
    ranks = 3 if method in ("prelort", "flexlora") else R
    clients = [make_state(device=device), make_state(ranks=ranks, device=device)]
    metas = [{"updated": {PATHS[0]: [0, 4]}}, {}] if method == "hafl" else None
    new, _ = aggregate(method, g, clients, [1.0, 2.0], metas)
    cpu, _ = aggregate(
        method,
        {k: v.cpu() for k, v in g.items()},
        [{k: v.cpu() for k, v in c.items()} for c in clients],
        [1.0, 2.0],
        metas,
    )
    for k in cpu:
        assert new[k].device == g[k].device
        torch.testing.assert_close(new[k].cpu(), cpu[k], atol=1e-5, rtol=1e-5)


def test_hetlora_falls_back_to_data_weights_when_every_product_is_zero():
    g = make_state()
    clients = [make_state(ranks=r) for r in (5, 2)]
    for c in clients:  # first round: B = 0 everywhere, so every ‖B_k A_k‖ is 0
        for p in PATHS:
            c[B(p)] = torch.zeros_like(c[B(p)])
    new, m = aggregate("hetlora", g, clients, [1.0, 3.0])
    assert m["hetlora_weights"][PATHS[0]] == pytest.approx([0.25, 0.75])
    exp = 0.25 * clients[0][A(PATHS[0])].clone()
    exp[:2] += 0.75 * clients[1][A(PATHS[0])]
    torch.testing.assert_close(new[A(PATHS[0])], exp)
    agg = Aggregator("hetlora", g)
    for c, w in zip(clients, [1.0, 3.0], strict=True):
        agg.add(c, w)
    torch.testing.assert_close(agg.result()[0][A(PATHS[0])], exp)


def test_hafl_previous_scores_fill_unreported_components():
    g = make_state()
    prev = {PATHS[0]: torch.full((R,), -1.0), PATHS[1]: torch.arange(R, dtype=torch.float32)}
    metas = [{"scores": {PATHS[0]: torch.ones(R)}}, {}]
    _, m = aggregate("hafl", g, [make_state(), make_state()], [1, 1], metas, prev_scores=prev)
    assert torch.equal(m["scores"][PATHS[0]], torch.ones(R))
    assert torch.equal(m["scores"][PATHS[1]], prev[PATHS[1]])
    small = make_state(ranks=2)
    meta = {"indices": {PATHS[0]: [1, 3], PATHS[1]: [0, 1]}, "scores": {PATHS[0]: [5.0, 7.0]}}
    _, m = aggregate("hafl", g, [small], [1], [meta], prev_scores=prev)
    assert m["scores"][PATHS[0]].tolist() == [-1.0, 5.0, -1.0, 7.0, -1.0]
