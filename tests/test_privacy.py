"""Client-level DP (fedlora.privacy): clipping, noise, public denominators, refusals, accounting.

Most tests use random factors (no model); one trains a tiny injected model through the methods'
own client sides. Tolerances: the server clips in float64 (relative error ~1e-16, bounded here by
1e-12); a client's clipped upload is ``download + δ`` rounded to float32, so the delta recovered
from it is off by at most one float32 rounding of each entry (``2^-24·(|download| + |upload|)``).
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.methods import Budget, names
from fedlora.methods import prefix as prefix_mod
from fedlora.methods.flexlora import client_factors

dpa = pytest.importorskip("dp_accounting")
privacy = pytest.importorskip("fedlora.privacy")

U32 = 2.0**-24
LORA = {"l0": (5, 7), "l1": (3, 4)}  # path: (d_out, d_in)
R = 6
RAVAN = {"r0": (4, 3), "r1": (4, 2)}  # path: (heads, r)
SAFE = {
    "fedit": {},
    "ffa": {},
    "hetlora": {"weighting": "data"},
    "prelort": {},
    "flexlora": {},
    "ravan": {"head_score": "random"},
    "hafl": {"hafl_mode": "truncate"},
}
PREFIX = ("hetlora", "prelort", "flexlora", "hafl")


def budget(rank=R, heads=2):
    return Budget(rank=rank, heads=heads, components=rank, steps=1)


def global_state(method, gen):
    g = {"head.weight": torch.randn(2, 3, generator=gen)}
    if method == "ravan":
        for p, (h, r) in RAVAN.items():
            g[f"{p}.lora_H"] = torch.randn(h, r, r, generator=gen)
            g[f"{p}.lora_s"] = torch.rand(h, generator=gen) + 0.5
        return g
    for p, (o, i) in LORA.items():
        g[f"{p}.lora_A.weight"] = torch.randn(R, i, generator=gen)
        g[f"{p}.lora_B.weight"] = torch.randn(o, R, generator=gen)
    return g


def download_of(method, g, b):
    if method == "flexlora":
        return client_factors(g, b.rank)
    if method in PREFIX:
        return prefix_mod.truncate(dict(g), b.rank)
    return {k: v.clone() for k, v in g.items()}


def client(method, g, b, gen, scale=1.0):
    """``(download, upload, meta)`` of one client with a random update of size ~``scale``."""
    down = download_of(method, g, b)
    meta = {}
    if method == "ravan":
        up = {"head.weight": down["head.weight"] + scale * torch.randn(2, 3, generator=gen)}
        meta["heads"] = {}
        for p, (h, r) in RAVAN.items():
            heads = sorted(torch.randperm(h, generator=gen)[: b.heads].tolist())
            folded = down[f"{p}.lora_H"] * down[f"{p}.lora_s"][:, None, None]
            up[f"{p}.lora_H"] = folded[heads] + scale * torch.randn(len(heads), r, r, generator=gen)
            meta["heads"][p] = heads
        return down, up, meta
    up = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in down.items()}
    if method == "ffa":
        up = {k: v for k, v in up.items() if not k.endswith(".lora_A.weight")}
    if method in PREFIX:
        meta["rank"] = b.rank
    if method == "hafl":
        meta["indices"] = {p: list(range(b.rank)) for p in LORA}
        meta["scores"] = {p: [1.0] * b.rank for p in LORA}  # stripped under DP
    return down, up, meta


def dp_config(**kw):
    kw.setdefault("clip", 0.5)
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("denominator", "sampled")
    return privacy.DPConfig(**kw)


def test_every_registered_method_has_dp_semantics():
    assert set(names()) <= set(privacy.DP_SEMANTICS)
    for name, entry in privacy.DP_SEMANTICS.items():
        assert entry.status in ("compatible", "restricted", "post-processing", "refused"), name
        assert entry.reason, name
        if entry.status == "restricted":
            assert entry.restriction, name


# ------------------------------------------------------------------------------------------------
# refusals and bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("flora", {}, "flora.*refused.*stacking"),
        ("fedex", {}, "fedex.*refused.*residual"),
        ("florana", {}, "florana.*refused.*per-client"),
        ("hetlora", {"weighting": "sparsity"}, "weighting='data'"),
        ("ravan", {"head_score": "gradient"}, "head_score.*'gradient'"),
        ("hafl", {}, "hafl_mode='truncate', got 'freeze'"),
        ("hafl", {"hafl_mode": "freeze"}, "importance"),
    ],
)
def test_unsafe_combinations_are_refused_in_one_line(method, options, match):
    with pytest.raises(ValueError, match=match) as err:
        privacy.check_dp_compatible(method, options)
    assert "\n" not in str(err.value)
    if privacy.DP_SEMANTICS[method].status == "refused":
        gen = torch.Generator().manual_seed(0)
        g = global_state("fedit", gen)
        with pytest.raises(ValueError, match="refused"):
            privacy.clip_update(method, g, g, {}, 1.0)
    gen = torch.Generator().manual_seed(0)
    g = global_state(method, gen)
    with pytest.raises(ValueError, match=match):
        privacy.private_aggregate(method, g, [], [], [], [], dp_config(), gen, options=options)


@pytest.mark.parametrize("method", list(SAFE))
def test_safe_combinations_are_accepted(method):
    entry = privacy.check_dp_compatible(method, SAFE[method])
    assert entry.status != "refused"
    if method == "ravan":  # the weight score ranks the (public) downloaded global
        privacy.check_dp_compatible("ravan", {"head_score": "weight"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip": 0.0, "noise_multiplier": 1.0}, "clip must be a positive"),
        ({"clip": -1.0, "noise_multiplier": 1.0}, "clip must be a positive"),
        ({"clip": math.nan, "noise_multiplier": 1.0}, "clip must be a positive"),
        ({"clip": 1.0, "noise_multiplier": 0.0}, "noise_multiplier must be a positive"),
        ({"clip": 1.0, "noise_multiplier": -2.0}, "noise_multiplier must be a positive"),
        ({"clip": 1.0}, "exactly one of noise_multiplier and target_epsilon"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "target_epsilon": 2.0}, "exactly one"),
        ({"clip": 1.0, "target_epsilon": 0.0}, "target_epsilon must be a positive"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 0.0}, r"delta must be in \(0, 1\)"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, r"delta must be in \(0, 1\)"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "delta": -1e-5}, r"delta must be in"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "weights": "data"}, "weights must be one of"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "weights": "capped"}, "weight_cap is required"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "denominator": "x"}, "denominator must be"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "accountant": "x"}, "accountant must be"),
    ],
)
def test_bad_dp_config_names_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        privacy.DPConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_unreachable_target_epsilon_is_one_line():
    dp = privacy.DPConfig(clip=1.0, target_epsilon=1e-3, delta=1e-5)
    with pytest.raises(
        ValueError, match=r"target_epsilon 0\.001 is unreachable in 100 rounds"
    ) as e:
        dp.resolved(100, 0.5)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        privacy.epsilon(10, 1.5, 1.0, 1e-5)
    with pytest.raises(ValueError, match="rounds must be a non-negative int"):
        privacy.epsilon(-1, 0.1, 1.0, 1e-5)


# ------------------------------------------------------------------------------------------------
# accounting
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rounds", "q", "z"), [(1, 1.0, 1.0), (100, 0.1, 1.1), (50, 0.3, 2.0)])
def test_epsilon_is_the_accountant_librarys_own(rounds, q, z):
    delta = 1e-5
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    rdp = dpa.rdp.RdpAccountant()
    rdp.compose(event)
    assert privacy.epsilon(rounds, q, z, delta) == rdp.get_epsilon(delta)
    pld = dpa.pld.PLDAccountant()
    pld.compose(event)
    assert privacy.epsilon(rounds, q, z, delta, accountant="pld") == pld.get_epsilon(delta)
    assert privacy.epsilon(0, q, z, delta) == 0.0


@pytest.mark.parametrize("z", [0.8, 2.0])
def test_one_full_round_matches_the_analytic_gaussian_mechanism(z):
    """q = 1, one round: the exact privacy curve of the Gaussian mechanism (Balle & Wang 2018),
    δ(ε) = Φ(1/2z − εz) − e^ε Φ(−1/2z − εz), an independent formula. The PLD accountant's ε is
    an upper bound (δ(ε) ≤ δ) and tight: 1% less ε already needs more than δ."""
    from scipy.stats import norm

    delta = 1e-5

    def curve(e):
        return norm.cdf(0.5 / z - e * z) - math.exp(e) * norm.cdf(-0.5 / z - e * z)

    eps = privacy.epsilon(1, 1.0, z, delta, accountant="pld")
    assert curve(eps) <= delta * (1 + 1e-6)
    assert curve(0.99 * eps) > delta
    assert privacy.epsilon(1, 1.0, z, delta) >= eps  # RDP is looser, never tighter


def test_noise_for_epsilon_inverts_epsilon_and_the_accountant_counts_rounds():
    rounds, q, delta, target = 30, 0.2, 1e-5, 4.0
    dp = privacy.DPConfig(clip=1.0, target_epsilon=target, delta=delta).resolved(rounds, q)
    z = dp.noise_multiplier  # noise_for_epsilon through the config
    assert privacy.epsilon(rounds, q, z, delta) <= target * (1 + 1e-3)
    assert privacy.epsilon(rounds, q, z * 0.98, delta) > target
    acc = privacy.PrivacyAccountant.for_config(dp, q)
    assert acc.epsilon == 0.0
    eps = []
    for _ in range(3):
        acc.step()
        eps.append(acc.epsilon)
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == privacy.epsilon(3, q, dp.noise_multiplier, delta)


# ------------------------------------------------------------------------------------------------
# clipping
# ------------------------------------------------------------------------------------------------


def _mixed_budgets(method):
    if method in PREFIX:
        return [budget(2), budget(4), budget(R)]
    if method == "ravan":
        return [budget(heads=1), budget(heads=2), budget(heads=4)]
    return [budget(), budget(), budget()]


@pytest.mark.parametrize("method", [m for m in names() if m in SAFE])
@pytest.mark.parametrize("scale", [10.0, 1e-3])
def test_clipping_bound_holds_for_every_dp_compatible_method(method, scale):
    gen = torch.Generator().manual_seed(1)
    g = global_state(method, gen)
    C = 0.5
    for b in _mixed_budgets(method):
        down, up, meta = client(method, g, b, gen, scale)
        delta = privacy.client_delta(method, g, down, up, meta, b)
        clipped, norm = privacy.clip_delta(delta.values, C)
        after = math.sqrt(sum(float(v.square().sum()) for v in clipped.values()))
        expect = math.sqrt(sum(float(v.square().sum()) for v in delta.values.values()))
        assert norm == pytest.approx(expect, rel=1e-12)
        if norm > C:
            assert after <= C * (1 + 1e-12)
            assert after == pytest.approx(C, rel=1e-12)
        else:  # below the clip: untouched
            assert all(torch.equal(clipped[k], delta.values[k]) for k in clipped)
        # the client's own clip: the upload format is kept, the bound up to float32 rounding
        out, out_meta, pre = privacy.clip_update(method, down, up, meta, C, global_state=g)
        assert pre == pytest.approx(expect, rel=1e-12)
        assert set(out) == set(up) and all(out[k].shape == up[k].shape for k in up)
        assert "scores" not in out_meta
        again = privacy.client_delta(method, g, down, out, out_meta, b)
        slack = sum(
            float(down_k.double().square().sum()) for down_k in down.values()
        ) ** 0.5 + 2 * max(norm, C)
        assert privacy.clip_delta(again.values, C)[1] <= min(norm, C) + 4 * U32 * slack


@pytest.mark.parametrize("method", ["fedit", "ffa", "prelort", "hafl", "ravan"])
def test_one_client_moves_the_global_by_at_most_the_clip(method):
    """End to end, one client, tiny noise: ``new − reference`` over what the client covers is its
    clipped delta, so its norm is at most ``C``."""
    gen = torch.Generator().manual_seed(2)
    g = global_state(method, gen)
    b = _mixed_budgets(method)[1]
    down, up, meta = client(method, g, b, gen, 10.0)
    dp = dp_config(clip=0.5, noise_multiplier=1e-9)
    new, m = privacy.private_aggregate(
        method, g, [down], [up], [meta], [b], dp, gen, options=SAFE[method]
    )
    assert m["dp_accepted"] == 1 and m["dp_clip_fraction"] == 1.0
    delta = privacy.client_delta(method, g, down, up, meta, b)
    moved = 0.0
    for key in delta.values:
        ref = g[key].double()
        if key.endswith(".lora_H"):
            ref = ref * g[key.replace("lora_H", "lora_s")].double()[:, None, None]
        if key.endswith("lora_A.weight") and method == "ffa":
            continue
        moved += float((new[key].double() - ref).square().sum())
    assert math.sqrt(moved) <= 0.5 * (1 + 1e-5)  # float32 output rounding
    assert math.sqrt(moved) >= 0.5 * (1 - 1e-5)


# ------------------------------------------------------------------------------------------------
# noise and denominators
# ------------------------------------------------------------------------------------------------


def test_noise_on_the_sum_has_the_documented_std():
    """Five clients with zero updates: ``new − global = N(0, (zC)²) / 5`` per coordinate. Over
    n coordinates Σx²/n of the standardised values has mean 1 and std √(2/n); 6 standard errors
    leave a false failure below 1e-8, and a std off by 1% (or noise on the mean instead of the
    sum: off by 5x) fails."""
    gen = torch.Generator().manual_seed(3)
    g = {"big.lora_A.weight": torch.zeros(128, 800), "big.lora_B.weight": torch.zeros(600, 128)}
    b = Budget(rank=128, heads=1, components=128, steps=1)
    K, z, C = 5, 1.3, 0.7
    dp = dp_config(clip=C, noise_multiplier=z)
    new, m = privacy.private_aggregate("fedit", g, [g] * K, [g] * K, [{}] * K, [b] * K, dp, gen)
    assert m["dp_noise_std"] == pytest.approx(z * C)
    x = torch.cat([(new[k].double() * K / (z * C)).reshape(-1) for k in g])
    n = x.numel()
    assert abs(float(x.mean())) < 6 / math.sqrt(n)
    assert abs(float(x.square().mean()) - 1) < 6 * math.sqrt(2 / n)
    assert 6 * math.sqrt(2 / n) < 0.021  # the test sees a 1% error in the std (2% in variance)
    # a different generator state gives different noise; the same seed the same
    again, _ = privacy.private_aggregate(
        "fedit", g, [g] * K, [g] * K, [{}] * K, [b] * K, dp, torch.Generator().manual_seed(3)
    )
    assert all(torch.equal(again[k], new[k]) for k in g)


def _prelort_round(gen, nan_client=None, scale=1.0):
    g = global_state("prelort", torch.Generator().manual_seed(4))
    budgets = [budget(2), budget(4), budget(4), budget(R)]
    rows = [client("prelort", g, b, gen, scale) for b in budgets]
    downs, ups, metas = (list(t) for t in zip(*rows, strict=True))
    if nan_client is not None:
        ups[nan_client] = dict(ups[nan_client])
        ups[nan_client]["l0.lora_B.weight"] = ups[nan_client]["l0.lora_B.weight"].clone()
        ups[nan_client]["l0.lora_B.weight"][0, 0] = math.nan
    return g, downs, ups, metas, budgets


def test_denominators_come_from_public_budgets_not_data():
    pop = privacy.Population([budget(2), budget(4), budget(4), budget(R), budget(R)], 0.4)
    for mode, expect in (
        ("sampled", [4, 4, 3, 3, 1, 1]),
        ("expected", [2.0] * 2 + [1.6] * 2 + [0.8] * 2),
    ):
        dens = []
        for seed, scale, bad in ((5, 1.0, None), (6, 100.0, 2)):
            g, downs, ups, metas, budgets = _prelort_round(
                torch.Generator().manual_seed(seed), bad, scale
            )
            dp = dp_config(denominator=mode)
            _, m = privacy.private_aggregate(
                "prelort",
                g,
                downs,
                ups,
                metas,
                budgets,
                dp,
                torch.Generator().manual_seed(0),
                population=pop,
            )
            dens.append(m["dp_denominators"])
        assert dens[0] == dens[1]  # the rejected NaN client still counts
        assert dens[0]["l0.lora_A.weight"] == pytest.approx(expect)
        assert dens[0]["head.weight"] == pytest.approx([4.0 if mode == "sampled" else 2.0])


def test_ravan_head_denominators_are_public_probabilities():
    gen = torch.Generator().manual_seed(7)
    g = global_state("ravan", gen)
    pop = privacy.Population([budget(heads=1), budget(heads=2), budget(heads=4)], 0.5)
    dp = dp_config(denominator="expected")
    _, m = privacy.private_aggregate(
        "ravan", g, [], [], [], [], dp, gen, population=pop, options={"head_score": "random"}
    )
    assert m["dp_denominators"]["r0.lora_H"] == pytest.approx([0.5 * (1 + 2 + 4) / 4] * 4)
    # weight score: the top-K heads of ‖s_i H_i‖ of the global surely, the rest never
    scores = torch.linalg.matrix_norm(g["r0.lora_H"] * g["r0.lora_s"][:, None, None])
    order = torch.argsort(scores, descending=True).tolist()
    _, m = privacy.private_aggregate(
        "ravan", g, [], [], [], [], dp, gen, population=pop, options={"head_score": "weight"}
    )
    want = [0.0] * 4
    for k in (1, 2, 4):
        for i in order[:k]:
            want[i] += 0.5
    assert m["dp_denominators"]["r0.lora_H"] == pytest.approx(want)
    # ties (round 1: every core 0) share the places uniformly, as select_heads' seeded order does
    g0 = {k: (torch.zeros_like(v) if k.endswith("lora_H") else v) for k, v in g.items()}
    _, m = privacy.private_aggregate(
        "ravan", g0, [], [], [], [], dp, gen, population=pop, options={"head_score": "weight"}
    )
    assert m["dp_denominators"]["r0.lora_H"] == pytest.approx([0.5 * 7 / 4] * 4)


def test_nonfinite_client_is_rejected_counted_and_never_averaged():
    gen = torch.Generator().manual_seed(8)
    g, downs, ups, metas, budgets = _prelort_round(gen, nan_client=1)
    dp = dp_config(denominator="sampled")
    acc = privacy.PrivacyAccountant(1.0, 0.5, 1e-5)
    new, m = privacy.private_aggregate(
        "prelort",
        g,
        downs,
        ups,
        metas,
        budgets,
        dp,
        torch.Generator().manual_seed(9),
        accountant=acc,
    )
    assert m["dp_rejected"] == 1 and m["dp_accepted"] == 3
    assert m["dp_rejected_clients"][0]["client"] == 1
    assert "non-finite" in m["dp_rejected_clients"][0]["reason"]
    assert all(torch.isfinite(v).all() for v in new.values())
    # the same as the client sending no update at all (its delta 0, its count kept)
    ups[1] = downs[1]
    same, _ = privacy.private_aggregate(
        "prelort", g, downs, ups, metas, budgets, dp, torch.Generator().manual_seed(9)
    )
    assert all(torch.equal(same[k], new[k]) for k in new)
    assert acc.rounds == 1 and m["epsilon"] == acc.epsilon > 0
    # every client rejected: the round still counts
    bad = [{k: torch.full_like(v, math.inf) for k, v in u.items()} for u in ups]
    _, m = privacy.private_aggregate(
        "prelort", g, downs, bad, metas, budgets, dp, gen, accountant=acc
    )
    assert m["dp_rejected"] == 4 and acc.rounds == 2


def test_an_upload_that_disagrees_with_its_public_budget_is_rejected():
    gen = torch.Generator().manual_seed(10)
    g, downs, ups, metas, budgets = _prelort_round(gen)
    budgets[0] = budget(3)  # the upload has rank 2
    _, m = privacy.private_aggregate("prelort", g, downs, ups, metas, budgets, dp_config(), gen)
    assert m["dp_rejected"] == 1 and "public budget" in m["dp_rejected_clients"][0]["reason"]


def test_hetlora_is_the_zero_padded_mean_and_flexlora_refactors_the_noised_factors():
    gen = torch.Generator().manual_seed(11)
    g = global_state("hetlora", gen)
    budgets = [budget(2), budget(4), budget(R)]
    rows = [client("hetlora", g, b, gen, 1e-2) for b in budgets]
    downs, ups, metas = (list(t) for t in zip(*rows, strict=True))
    dp = dp_config(clip=10.0, noise_multiplier=1e-12)  # no clipping, no noise to speak of
    new, _ = privacy.private_aggregate(
        "hetlora", g, downs, ups, metas, budgets, dp, gen, options={"weighting": "data"}
    )
    A = torch.zeros(R, LORA["l0"][1], dtype=torch.float64)
    for u in ups:
        a = u["l0.lora_A.weight"].double()
        A[: a.shape[0]] += a / 3
    torch.testing.assert_close(new["l0.lora_A.weight"].double(), A, rtol=1e-5, atol=1e-6)
    # FlexLoRA: the product of its re-balanced factors is the product of the noised means
    # (PreLort's segment rule on the same inputs, same noise)
    g = global_state("flexlora", gen)
    rows = [client("flexlora", g, b, gen, 1e-1) for b in budgets]
    downs, ups, metas = (list(t) for t in zip(*rows, strict=True))
    dp = dp_config(clip=0.3, noise_multiplier=0.5)
    flex, _ = privacy.private_aggregate(
        "flexlora", g, downs, ups, metas, budgets, dp, torch.Generator().manual_seed(0)
    )
    seg, _ = privacy.private_aggregate(
        "prelort", g, downs, ups, metas, budgets, dp, torch.Generator().manual_seed(0)
    )
    for p in LORA:
        got = flex[f"{p}.lora_B.weight"].double() @ flex[f"{p}.lora_A.weight"].double()
        want = seg[f"{p}.lora_B.weight"].double() @ seg[f"{p}.lora_A.weight"].double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_capped_weights_bound_each_client_to_the_cap():
    gen = torch.Generator().manual_seed(12)
    g = global_state("fedit", gen)
    b = budget()
    rows = [client("fedit", g, b, gen, 1e-3) for _ in range(2)]
    downs, ups, metas = (list(t) for t in zip(*rows, strict=True))
    dp = dp_config(clip=1.0, noise_multiplier=1e-12, weights="capped", weight_cap=100)
    new, m = privacy.private_aggregate(
        "fedit", g, downs, ups, metas, [b, b], dp, gen, num_examples=[50, 1000]
    )
    assert m["dp_denominators"]["head.weight"] == pytest.approx([1.5])
    want = (
        g["head.weight"]
        + (
            0.5 * (ups[0]["head.weight"] - g["head.weight"])
            + (ups[1]["head.weight"] - g["head.weight"])
        )
        / 1.5
    )
    torch.testing.assert_close(new["head.weight"], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"capped.*num_examples"):
        privacy.private_aggregate("fedit", g, downs, ups, metas, [b, b], dp, gen)
    with pytest.raises(ValueError, match="needs the population"):
        privacy.private_aggregate(
            "fedit", g, downs, ups, metas, [b, b], dp_config(denominator="expected"), gen
        )


# ------------------------------------------------------------------------------------------------
# a tiny injected model through the methods' own client sides
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options"), [("prelort", {}), ("ravan", {"head_score": "random"})]
)
def test_a_dp_round_on_a_tiny_injected_model(method, options):
    import fedlora
    from fedlora.methods import ClientOptions, get

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6))
    impl = get(method)
    copts = ClientOptions(rank=4, heads=4, **options)
    budgets = [
        Budget(rank=2, heads=1, components=2, steps=2),
        Budget(rank=4, heads=2, components=4, steps=2),
    ]
    side = impl.client(copts, budgets)
    fedlora.inject(model, method, target_modules=["0", "2"], **side.layer_options())
    side.setup(model)
    g = fedlora.get_adapter_state_dict(model)
    x, y = torch.randn(16, 6), torch.randn(16, 6)
    downs, ups, metas = [], [], []
    for k, b in enumerate(budgets):
        down = side.download(g, b)
        side.prepare(model, 0, down, b, seed=k)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(b.steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        up, meta = side.upload(model, 0, b)
        up, meta, norm = privacy.clip_update(method, down, up, meta, 0.05, global_state=g)
        assert norm > 0.05  # lr 0.5: the update is larger than the clip
        downs.append(down), ups.append(up), metas.append(meta)
    dp = dp_config(clip=0.05, noise_multiplier=0.1)
    acc = privacy.PrivacyAccountant(0.1, 1.0, 1e-5)
    new, m = privacy.private_aggregate(
        method,
        g,
        downs,
        ups,
        metas,
        budgets,
        dp,
        torch.Generator().manual_seed(0),
        options=options,
        accountant=acc,
    )
    # the uploads come clipped (up to float32 rounding): the server's clip leaves them be
    assert m["dp_accepted"] == 2 and m["dp_clip_fraction"] in (0.0, 0.5, 1.0) and m["epsilon"] > 0
    for down, up, meta, b in zip(downs, ups, metas, budgets, strict=True):
        delta = privacy.client_delta(method, g, down, up, meta, b)
        assert privacy.clip_delta(delta.values, 0.05)[1] <= 0.05 * (1 + 1e-5)
    assert set(new) == set(g) and all(new[k].shape == g[k].shape for k in g)
    fedlora.set_adapter_state_dict(model, new)  # the result loads back into the model


def test_readme_privacy_table_matches_the_semantics():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("| method | under DP |", 1)[1].split("\n\n", 1)[0]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in table.splitlines()
        if line.startswith("| ")
    }
    for name in names():
        assert name in rows, f"README's privacy table has no row for {name}"
        assert rows[name].startswith(privacy.DP_SEMANTICS[name].status), name


def test_a_method_without_dp_semantics_is_refused():
    from fedlora.methods import Method, register, unregister
    from fedlora.methods.fedit import aggregate

    register(Method(name="mine_no_dp", layer="lora", ranks="equal", aggregate=aggregate))
    try:
        with pytest.raises(ValueError, match="'mine_no_dp' declares no DP semantics"):
            privacy.check_dp_compatible("mine_no_dp")
    finally:
        unregister("mine_no_dp")


def test_expected_denominators_leave_uncovered_indices_and_weigh_the_population():
    gen = torch.Generator().manual_seed(13)
    g, downs, ups, metas, budgets = _prelort_round(gen)
    budgets, downs, ups, metas = budgets[:3], downs[:3], ups[:3], metas[:3]  # ranks 2, 4, 4
    pop = privacy.Population([budget(2), budget(4)], 0.5, num_examples=[10, 400])
    dp = dp_config(denominator="expected", weights="capped", weight_cap=100)
    new, m = privacy.private_aggregate(
        "prelort",
        g,
        downs,
        ups,
        metas,
        budgets,
        dp,
        gen,
        population=pop,
        num_examples=[10, 400, 50],
    )
    # w = 0.1 and 1 in the population: q·Σ w·[r > j] = 0.55 for j < 2, 0.5 for j < 4, then 0
    assert m["dp_denominators"]["l0.lora_A.weight"] == pytest.approx(
        [0.55] * 2 + [0.5] * 2 + [0] * 2
    )
    assert m["dp_sample_rate"] == 0.5
    assert torch.equal(new["l0.lora_A.weight"][4:], g["l0.lora_A.weight"][4:])
    assert torch.equal(new["l0.lora_B.weight"][:, 4:], g["l0.lora_B.weight"][:, 4:])
    assert not torch.equal(new["l0.lora_A.weight"][:4], g["l0.lora_A.weight"][:4])


def test_a_dp_run_still_learns_on_a_synthetic_federated_task():
    """bench/privacy_utility.py's loop, small: 200 clients, 30 per round, 8 rounds of FedIT with
    clipping at C = 0.3 (about the 90th percentile of the update norms) and noise z = 0.7 on the
    sums (ε ≈ 8.5 at δ = 1e-5): the DP run must still learn (well under the untrained MSE)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "privacy_utility.py"
    spec = importlib.util.spec_from_file_location("privacy_utility_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    task = bench.make_task(200, 20, 0)
    kw = {"rounds": 8, "per_round": 30, "clip": 0.3, "lr": 0.1}
    plain = bench.run("fedit", None, task, **kw)
    private = bench.run("fedit", None, task, noise_multiplier=0.7, track_epsilon=False, **kw)
    assert plain["relative_mse"] < 0.5  # the task is learnable in 8 rounds (0.38 here)
    assert private["relative_mse"] < 0.7  # and learned under DP (0.42 here; seeds 1, 2: 0.40, 0.50)
    assert 0 < private["epsilon"] < math.inf and private["rejected"] == 0


def test_bad_arguments_to_the_server_name_the_argument():
    gen = torch.Generator().manual_seed(14)
    g, downs, ups, metas, budgets = _prelort_round(gen)
    dp = dp_config()
    with pytest.raises(TypeError, match=r"dp must be a fedlora\.privacy\.DPConfig"):
        privacy.private_aggregate("prelort", g, downs, ups, metas, budgets, {"clip": 1}, gen)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        privacy.private_aggregate("prelort", g, downs, ups, metas, budgets, dp, 3)
    with pytest.raises(TypeError, match=r"budgets must be fedlora\.methods\.Budget"):
        privacy.private_aggregate("prelort", g, downs, ups, metas, [2, 4, 4, 6], dp, gen)
    with pytest.raises(ValueError, match="one entry per sampled client"):
        privacy.private_aggregate("prelort", g, downs[:2], ups, metas, budgets, dp, gen)
    with pytest.raises(ValueError, match="noise_multiplier is not set"):
        unresolved = privacy.DPConfig(clip=1.0, target_epsilon=4.0)
        privacy.private_aggregate("prelort", g, downs, ups, metas, budgets, unresolved, gen)
    with pytest.raises(ValueError, match="method must be one of"):
        privacy.check_dp_compatible("nope")


def test_ravan_weight_head_choice_follows_the_public_probabilities():
    """The claim behind allowing ``head_score='weight'``: the choice depends only on the
    downloaded global and the seed. Prepared through RavanClient over many seeds, each head is
    chosen with the probability the server computes (ties share places uniformly); 400 seeds put
    5 binomial standard errors at 0.125."""
    import fedlora
    from fedlora.methods import ClientOptions, get
    from fedlora.methods.ravan import ravan_layers

    impl = get("ravan")
    b = Budget(rank=2, heads=2, components=2, steps=1)
    side = impl.client(ClientOptions(rank=2, heads=4, head_score="weight"), [b])
    model = torch.nn.Sequential(torch.nn.Linear(6, 6))
    fedlora.inject(model, "ravan", target_modules=["0"], **side.layer_options())
    side.setup(model)
    g = fedlora.get_adapter_state_dict(model)
    H = torch.zeros_like(g["0.lora_H"])
    for i, size in enumerate([3.0, 1.0, 1.0, 0.5]):  # heads 1 and 2 tie for the second place
        H[i, 0, 0] = size
    g["0.lora_H"] = H
    want = privacy.ravan_head_probabilities(g, "0", 2, "weight")
    assert want.tolist() == [1.0, 0.5, 0.5, 0.0]
    counts = torch.zeros(4)
    seeds = 400
    for seed in range(seeds):
        side.prepare(model, 0, g, b, seed=seed)
        counts[ravan_layers(model)[0][1].trainable_heads(0)] += 1
    assert torch.all((counts / seeds - want.float()).abs() <= 5 * math.sqrt(0.25 / seeds))
