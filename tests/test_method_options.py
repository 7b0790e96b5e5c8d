"""Methods own their options (issue 17 item 5, issue 21 items 2-3): the option specs, the CLI flags
and config checks derived from them, one definition of upload size, per-task default learning
rates, and each ablation option changing behaviour where the right answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fedlora
from fedlora import methods
from fedlora.cli import main
from fedlora.methods import Budget, ClientOptions, hafl, hetlora, prefix, prelort
from fedlora.simulate.compare import matched, passes, passes_per_round
from fedlora.simulate.config import ConfigError, SimConfig
from fedlora.state_dict import adapter_layers, get_adapter_state_dict

A, B = ".lora_A.weight", ".lora_B.weight"


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def _refused(code: int, err: str, words: str) -> None:
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err


# ----------------------------------------------------------------------------- the option specs
def test_every_option_has_one_spec_and_a_cli_flag():
    from fedlora.cli import build_parser

    owners = methods.option_owners()
    assert {"heads", "head_score", "hafl_mode", "hafl_score_steps", "hafl_score",
            "hafl_aggregation", "prelort_aggregation", "prelort_training",
            "prelort_truncations", "hetlora_prune"} <= set(owners)  # fmt: skip
    assert owners["hafl_mode"][1] == ("hafl",) and owners["heads"][1] == ("ravan",)
    sim = build_parser()._subparsers._group_actions[0].choices["simulate"]
    flags = {f for a in sim._actions for f in a.option_strings}
    assert {opt.flag for opt, _ in owners.values()} <= flags
    for name in methods.names():  # defaults pass their own checks
        m = methods.get(name)
        assert m.option_values() == {o.name: o.default for o in m.options}


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--hafl-mode", "truncate"], "--hafl-mode: method fedit takes no such option"),
        (["--method", "hetlora", "--prelort-training", "flat"], "taken by prelort"),
        (["--method", "prelort", "--prelort-training", "flat", "--prelort-truncations", "2"],
         "--prelort-truncations: --prelort-training flat"),
        (["--method", "prelort", "--prelort-truncations", "2,16"], "exceeds the global rank"),
        (["--method", "prelort", "--prelort-truncations", "2,x"], "comma list of integers"),
        (["--method", "hetlora", "--hetlora-prune-gamma", "0.5"], "self-pruning is off"),
        (["--method", "hetlora", "--hetlora-prune", "--hetlora-prune-gamma", "1.5"],
         "--hetlora-prune-gamma must be in"),
        (["--method", "hafl", "--hafl-mode", "truncate", "--hafl-score-steps", "2"],
         "runs no scoring steps"),
        (["--method", "hafl", "--hafl-score", "fisher"], "invalid choice"),
    ],
)  # fmt: skip
def test_options_refused_in_one_line_before_anything_runs(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    code, err = _cli(capsys, "simulate", "--out", str(out), "--clients", "2", *argv)
    _refused(code, err, words)
    assert not out.exists()


def test_compare_refuses_an_option_no_compared_method_takes(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _cli(capsys, "compare", "--methods", "fedit,hetlora", "--out", str(out),
                     "--hafl-aggregation", "zeropad")  # fmt: skip
    _refused(code, err, "none of fedit, hetlora takes no such option (taken by hafl)")
    assert not out.exists()


def test_python_api_refuses_like_the_cli():
    with pytest.raises(ConfigError, match="method fedit takes no such option"):
        SimConfig(method="fedit", method_options={"prelort_training": "flat"}).validate()
    with pytest.raises(ConfigError, match="--prelort-training must be one of"):
        SimConfig(method="prelort", method_options={"prelort_training": "x"}).validate()
    with pytest.raises(TypeError, match="--hafl-aggregation must be a string"):
        methods.get("hafl").option_values({"hafl_aggregation": 3})


def test_label_names_the_non_default_options():
    assert SimConfig(method="hetlora").label() == "hetlora"
    cfg = SimConfig(method="hetlora", method_options={"hetlora_prune": True})
    assert cfg.label() == "hetlora (hetlora_prune=True)"
    assert SimConfig(method="hafl", hafl_mode="truncate").label() == "hafl (hafl_mode=truncate)"


def test_default_learning_rate_per_method_and_task():
    assert SimConfig(task="sft", method="ravan").lr == methods.get("ravan").default_lr["sft"]
    assert SimConfig(task="sft", method="fedit").lr == 1e-3  # the task's default
    assert SimConfig(task="classify", method="ravan").lr == 5e-3  # no classify entry: the task's
    assert SimConfig(task="sft", method="ravan", lr=2e-3).lr == 2e-3  # given wins


# ----------------------------------------------------------------------------- upload size
def _net(method: str, client: methods.Client) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 7))
    return fedlora.inject(net, method, target_modules=["0", "2"], **client.layer_options())


@pytest.mark.parametrize(
    "method,options,budget",
    [
        ("fedit", {}, Budget(4, 2, 4, 1)),
        ("ffa", {}, Budget(4, 2, 4, 1)),
        ("hetlora", {}, Budget(3, 2, 4, 1)),
        ("prelort", {}, Budget(2, 2, 4, 1)),
        ("hafl", {"hafl_score_steps": 0}, Budget(4, 2, 3, 1)),
        ("ravan", {"heads": 3}, Budget(4, 2, 4, 1)),
    ],
)
def test_upload_numel_is_what_the_client_uploads(method, options, budget):
    """One definition of upload size: ``Method.upload_numel`` per layer equals the numbers the
    client side actually uploads (the adapter keys of its upload)."""
    m = methods.get(method)
    opts = ClientOptions(rank=4, heads=options.get("heads", 4), method_options=options)
    client = m.client(opts, [budget])
    model = _net(method, client)
    client.setup(model)
    client.start_round(model, 0)
    down = client.download(get_adapter_state_dict(model, slot=0), budget)
    client.prepare(model, 0, down, budget, seed=3)
    client.scoring_done(model, 0, budget, seed=3)
    state, _ = client.upload(model, 0, budget)
    sent = sum(v.numel() for v in state.values())
    want = sum(
        m.upload_numel(budget, (layer.out_features, layer.in_features), opts)
        for _, layer in adapter_layers(model)
    )
    assert sent == want
    assert prefix.nbytes(state) == 4 * want  # float32 on the wire


def test_comm_matching_comes_from_upload_numel():
    base = dict(task="sft", rank=4, heads=2)
    assert matched(SimConfig(method="ravan", **base), "comm").rank == 48  # 2 r^2 ~ 4 * 1152
    ffa = matched(SimConfig(method="ffa", **base), "comm")
    assert (ffa.rank, ffa.alpha) == (8, 32.0)  # B only: twice the rank, alpha/rank kept
    assert matched(SimConfig(method="hetlora", **base), "comm").rank == 4


# ----------------------------------------------------------------------------- compute
def test_passes_count_nested_copies_and_scoring_steps():
    pre = SimConfig(method="prelort", clients=3, rank=8, local_steps=5, budgets="rank=2,4,8")
    assert passes(pre) == [5, 10, 15]  # T_k = {2}, {2,4}, {2,4,8}
    assert passes_per_round(pre) == 30
    sampled = SimConfig(**{**pre.__dict__, "method_options": {"prelort_training": "sampled"}})
    assert passes(sampled) == [5, 5, 5]
    hf = SimConfig(method="hafl", clients=2, local_steps=5, hafl_score_steps=2)
    assert passes(hf) == [7, 7]
    assert passes_per_round(SimConfig(method="fedit", clients=10, clients_per_round=4)) == 20
    m = matched(pre, "compute")
    assert passes(m) == [5, 4, 6] and m.budgets.endswith("steps=5,2,2")  # round(5 / copies)
    assert matched(SimConfig(method="fedit"), "compute") == SimConfig(method="fedit")


# ----------------------------------------------------------------------------- PreLort
def _factors(ranks, R=3, d_in=4, d_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    glob = {"m" + A: torch.randn(R, d_in, generator=g), "m" + B: torch.randn(d_out, R, generator=g)}
    clients = [
        {"m" + A: torch.randn(r, d_in, generator=g), "m" + B: torch.randn(d_out, r, generator=g)}
        for r in ranks
    ]
    return glob, clients


@pytest.mark.parametrize("streaming", [False, True])
def test_prelort_segment_vs_zeropad_on_hand_built_factors(streaming):
    glob, cl = _factors([1, 2])
    p = [0.25, 0.75]

    def agg(**kw):
        if not streaming:
            return fedlora.aggregate("prelort", glob, cl, p, [{}, {}], **kw)[0]
        acc = fedlora.Aggregator("prelort", glob, **kw)
        for c, w in zip(cl, p, strict=True):
            acc.add(c, w)
        return acc.result()[0]

    seg, zp = agg(), agg(aggregation="zeropad")
    a1, a2 = cl[0]["m" + A], cl[1]["m" + A]
    b1, b2 = cl[0]["m" + B], cl[1]["m" + B]
    # index 0: both clients hold it, both rules average it
    for out in (seg, zp):
        torch.testing.assert_close(out["m" + A][0], 0.25 * a1[0] + 0.75 * a2[0])
        torch.testing.assert_close(out["m" + B][:, 0], 0.25 * b1[:, 0] + 0.75 * b2[:, 0])
    # index 1: client 2 alone. segment: taken whole; zero-padding: shrunk by its weight
    torch.testing.assert_close(seg["m" + A][1], a2[1])
    torch.testing.assert_close(zp["m" + A][1], 0.75 * a2[1])
    torch.testing.assert_close(zp["m" + B][:, 1], 0.75 * b2[:, 1])
    # index 2: nobody. segment: the global's; zero-padding: 0
    torch.testing.assert_close(seg["m" + A][2], glob["m" + A][2])
    assert torch.count_nonzero(zp["m" + A][2]) == 0


def test_prelort_training_variants_and_the_sampled_sequence():
    budgets = [Budget(2, 1, 2, 3), Budget(4, 1, 4, 3), Budget(8, 1, 8, 3)]

    def client(**opts):
        return prelort.METHOD.client(ClientOptions(rank=8, method_options=opts), budgets)

    assert client().truncations(budgets[2]) == [2, 4, 8]
    assert client(prelort_truncations=(1, 6)).truncations(budgets[2]) == [1, 6, 8]
    assert client(prelort_truncations=(1, 6)).truncations(budgets[1]) == [1, 4]
    assert client(prelort_training="flat").truncations(budgets[2]) is None
    # sampled: one t per step, drawn by sample_truncation from the generator seeded by prepare
    rule = client(prelort_training="sampled")
    model = _net("prelort", rule)
    down = rule.download(get_adapter_state_dict(model, slot=0), budgets[2])
    rule.prepare(model, 0, down, budgets[2], seed=1234)
    got = [rule.truncations(budgets[2]) for _ in range(40)]
    gen = torch.Generator().manual_seed(1234)
    want = [[prelort.sample_truncation([2, 4, 8], gen)] for _ in range(40)]
    assert got == want
    assert {t for (t,) in got} == {2, 4, 8}  # every truncation is drawn
    rule.prepare(model, 0, down, budgets[2], seed=1234)  # the same seed: the same sequence
    assert [rule.truncations(budgets[2]) for _ in range(40)] == want


def test_prelort_options_reach_a_run(tiny_bert_dir):
    """--prelort-aggregation and --prelort-training reach the server and client of a run, and
    every round's row logs the segment norms of the new global."""
    from fedlora.simulate import run

    base = dict(method="prelort", clients=3, rounds=1, local_steps=1, batch_size=4,
                max_length=16, max_test=16, rank=4, lr=1e-2, model=tiny_bert_dir,
                target_modules=["query", "value"], budgets="rank=1,2,4")  # fmt: skip
    seg = run(SimConfig(**base), progress=False)
    zp = run(SimConfig(**base, method_options={"prelort_aggregation": "zeropad"}), progress=False)
    norms = seg.rounds[0]["segment_norms"]
    assert list(norms) == ["0:1", "1:2", "2:4"] and all(v > 0 for v in norms.values())
    bounds = [1, 2, 4]
    assert norms == pytest.approx(prefix.segment_norms(seg.global_state, bounds), rel=1e-6)
    # the same uploads, zero-padded: a segment held by clients S shrinks both factors by
    # Σ_{k∈S} p_k, so its ‖B A‖ by the square (index 0 is held by all: unchanged)
    n = seg.data["clients"]
    p = [x / sum(n) for x in n]
    zn = zp.rounds[0]["segment_norms"]
    assert zn["0:1"] == pytest.approx(norms["0:1"], rel=1e-4)
    assert zn["1:2"] == pytest.approx(norms["1:2"] * (p[1] + p[2]) ** 2, rel=1e-4)
    assert zn["2:4"] == pytest.approx(norms["2:4"] * p[2] ** 2, rel=1e-4)


def test_segment_norms_match_the_dense_products():
    g = torch.Generator().manual_seed(1)
    state = {}
    for p in ("a", "b"):
        state[p + A] = torch.randn(6, 9, generator=g)
        state[p + B] = torch.randn(7, 6, generator=g)
    got = prefix.segment_norms(state, prefix.segment_bounds(6, [2, 2, 5, 6, 9]))
    assert list(got) == ["0:2", "2:5", "5:6"]
    for key, value in got.items():
        lo, hi = map(int, key.split(":"))
        dense = sum(
            (state[p + B][:, lo:hi].double() @ state[p + A][lo:hi].double()).square().sum()
            for p in ("a", "b")
        )
        assert value == pytest.approx(math.sqrt(float(dense)), rel=1e-9)


# ----------------------------------------------------------------------------- HAFL
def test_hafl_adaptive_vs_zeropad_on_hand_built_factors():
    glob, cl = _factors([3, 3])
    metas = [{"updated": {"m": [0]}}, {"updated": {"m": [0, 1]}}]
    p = [0.25, 0.75]
    ad, _ = fedlora.aggregate("hafl", glob, cl, p, metas)
    zp, _ = fedlora.aggregate("hafl", glob, cl, p, metas, aggregation="zeropad")
    a1, a2 = cl[0]["m" + A], cl[1]["m" + A]
    for out in (ad, zp):
        torch.testing.assert_close(out["m" + A][0], 0.25 * a1[0] + 0.75 * a2[0])
    torch.testing.assert_close(ad["m" + A][1], a2[1])  # the one updater, taken whole
    torch.testing.assert_close(zp["m" + A][1], 0.75 * a2[1])  # shrunk by Σ_{k updated} p_k
    torch.testing.assert_close(ad["m" + A][2], glob["m" + A][2])  # nobody: unchanged
    assert torch.count_nonzero(zp["m" + A][2]) == 0  # nobody: zero-padded to 0
    acc = fedlora.Aggregator("hafl", glob, aggregation="zeropad")
    for c, w, meta in zip(cl, p, metas, strict=True):
        acc.add(c, w, meta)
    torch.testing.assert_close(acc.result()[0]["m" + A], zp["m" + A])


def test_hafl_score_option_picks_the_element_score():
    for name, score in (("sensitivity", "ema"), ("sensitivity_uncertainty", "ema_unc")):
        opts = ClientOptions(rank=4, method_options={"hafl_score": name})
        rule = hafl.METHOD.client(opts, [Budget(4, 1, 2, 1)])
        rule.setup(_net("hafl", rule))
        assert rule.tracker.score == score


# ----------------------------------------------------------------------------- HetLoRA pruning
def _set_slot(model, rank, scale_tail):
    """Every layer's slot 0: A = 0.1, B = 0.2, B's tail columns (index >= 2) times scale_tail."""
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_A[0].fill_(0.1)
            layer.lora_B[0].fill_(0.2)
            layer.lora_B[0, :, 2:rank] *= scale_tail


def test_hetlora_self_pruning_prunes_exactly_by_its_rule():
    """γ = 0.5, rank 4: the tail is components 2, 3. Every round the client RECEIVES a tail of
    scale 1. Round 1 trains it to 2 (larger than received: kept); round 2 to 1.5 (larger than
    received: kept, although smaller than round 1's end, where a rule comparing with the
    previous round would prune); round 3 to 0.5 (smaller: pruned to rank 2, in the upload and
    later downloads). Without --hetlora-prune nothing is ever pruned."""
    budget = Budget(4, 1, 4, 1)
    opts = {"hetlora_prune": True, "hetlora_prune_gamma": 0.5, "hetlora_prune_lambda": 0.0}
    rule = hetlora.METHOD.client(ClientOptions(rank=4, method_options=opts), [budget])
    off = hetlora.METHOD.client(ClientOptions(rank=4), [budget])
    model = _net("hetlora", rule)
    _set_slot(model, 4, 1.0)
    glob = get_adapter_state_dict(model, slot=0)
    ranks = []
    for tail, other in ((2.0, off), (1.5, off), (0.5, off)):
        for r in (rule, other):
            r.prepare(model, 0, r.download(glob, budget), budget, seed=0)
            _set_slot(model, 4, tail)
            state, meta = r.upload(model, 0, budget)
            if r is rule:
                ranks.append((meta["rank"], state["0" + A].shape[0]))
            else:
                assert meta["rank"] == 4
    assert ranks == [(4, 4), (4, 4), (2, 2)]
    assert rule.rank(budget) == 2 and rule.download(glob, budget)["0" + A].shape[0] == 2
    # the recorded tail norm is the Gram formula of the slot
    n = hetlora.tail_norm(model, 0, 4, 2)
    dense = sum(
        (layer.lora_B[0, :, 2:4].detach().double() @ layer.lora_A[0, 2:4].detach().double())
        .square()
        .sum()
        for _, layer in adapter_layers(model)
    )
    assert n == pytest.approx(math.sqrt(float(dense)), rel=1e-9)


def test_hetlora_tail_regulariser_gradient_is_the_norms_gradient():
    """after_backward adds λ ∇‖B_t A_t‖_F to the tail's gradients (checked against autograd)."""
    budget = Budget(4, 1, 4, 1)
    lam = 0.3
    opts = {"hetlora_prune": True, "hetlora_prune_gamma": 0.5, "hetlora_prune_lambda": lam}
    rule = hetlora.METHOD.client(ClientOptions(rank=4, method_options=opts), [budget])
    model = _net("hetlora", rule)
    rule.prepare(model, 0, rule.download(get_adapter_state_dict(model), budget), budget, seed=0)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.normal_()
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.lora_A.grad = torch.zeros_like(layer.lora_A)
        layer.lora_B.grad = torch.zeros_like(layer.lora_B)
    rule.after_backward(model, [0])
    for layer in layers:
        A_ = layer.lora_A.detach()[0].clone().requires_grad_(True)
        B_ = layer.lora_B.detach()[0].clone().requires_grad_(True)
        (lam * (B_[:, 2:] @ A_[2:]).norm()).backward()
        torch.testing.assert_close(layer.lora_A.grad[0], A_.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad[0], B_.grad, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(layer.lora_A.grad[0, :2]) == 0  # the kept prefix: untouched


# ----------------------------------------------------------------------------- FLoRA-NA
def test_florana_reports_flexloras_svd_error_on_the_same_uploads():
    glob, cl = _factors([3, 3, 3], R=2, d_in=7, d_out=6, seed=4)
    glob = {k: v[:2] if k.endswith(A) else v[:, :2] for k, v in glob.items()}
    cl = [{k: v[:2] if k.endswith(A) else v[:, :2] for k, v in c.items()} for c in cl]
    p = [0.2, 0.3, 0.5]
    _, m = fedlora.aggregate("florana", glob, cl, p, svd_error=True)
    ideal = sum(w * c["m" + B].double() @ c["m" + A].double() for w, c in zip(p, cl, strict=True))
    U, S, Vh = torch.linalg.svd(ideal)
    best = (U[:, :2] * S[:2]) @ Vh[:2]
    assert m["svd_error"] == pytest.approx(float((ideal - best).norm() / ideal.norm()), rel=1e-9)
    _, flex = fedlora.aggregate("flexlora", glob, cl, p, error=True)  # FlexLoRA's own rule
    assert m["svd_error"] == pytest.approx(flex["aggregation_error"], rel=1e-5)
    assert m["svd_error"] <= m["florana_fit_error"] <= m["fedit_error"]  # best rank-2 is optimal
    assert "svd_error" not in fedlora.aggregate("florana", glob, cl, p)[1]  # off by default


# ----------------------------------------------------------------------------- received models
def test_compare_evaluates_what_each_client_rank_receives(tiny_bert_dir, monkeypatch):
    """HAFL truncation's rank-2 clients receive the top-2 components by the server's last
    scores (not the prefix); HetLoRA's the prefix; HAFL freezing's the whole global (its
    numbers reused, not re-evaluated)."""
    import fedlora.simulate.engine as engine
    from fedlora.simulate.compare import prefix_metrics
    from fedlora.simulate.tasks import get_task

    seen = []

    def fake_eval(model, task, state, test, cfg):
        seen.append(state)
        return {"test_accuracy": float(len(seen))}

    monkeypatch.setattr(engine, "evaluate_global", fake_eval)
    base = dict(clients=2, rank=4, budgets="rank=2,4;components=2,4", model=tiny_bert_dir,
                target_modules=["query", "value"], max_length=16)  # fmt: skip
    cfg = SimConfig(method="hafl", hafl_mode="truncate", **base).validate()
    data = get_task("classify").load_data(cfg)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) for k, v in _hafl_global(cfg, data).items()}
    paths = [k[: -len(A)] for k in state if k.endswith(A)]
    scores = {p: [0.0, 3.0, 1.0, 2.0] for p in paths}  # top 2: components 1 and 3
    out = prefix_metrics(cfg, state, data, {"scores": scores})
    assert sorted(out) == [2, 4] and len(seen) == 2
    got = seen[1]  # the global (rank 4) is evaluated first, then what rank 2 receives
    for p in paths:
        torch.testing.assert_close(got[p + A], state[p + A][[1, 3]])
        torch.testing.assert_close(got[p + B], state[p + B][:, [1, 3]])
    seen.clear()
    het = prefix_metrics(SimConfig(method="hetlora", **base).validate(), state, data)
    assert sorted(het) == [2, 4]
    torch.testing.assert_close(seen[1][paths[0] + A], state[paths[0] + A][:2])
    seen.clear()
    frz = prefix_metrics(SimConfig(method="hafl", **base).validate(), state, data)
    assert len(seen) == 1 and frz[2] == frz[4]  # freezing: every class receives the global
    assert prefix_metrics(SimConfig(method="fedit", **base).validate(), state, data) is None


def _hafl_global(cfg: SimConfig, data) -> dict[str, torch.Tensor]:
    from fedlora.methods import get
    from fedlora.simulate.config import parse_budgets
    from fedlora.simulate.tasks import get_task

    rule = get(cfg.method).client(cfg.client_options(), parse_budgets(cfg))
    model, _ = get_task(cfg.task).build_model(cfg, data, 1, rule)
    return get_adapter_state_dict(model, slot=0)


def test_budgets_that_cannot_be_matched_are_refused():
    pre = SimConfig(method="prelort", clients=3, budgets="rank=2,4,8", local_steps=1)
    with pytest.raises(ConfigError, match="--match compute: prelort's client 1 takes 2 passes"):
        matched(pre, "compute")
    wide = SimConfig(method="ravan", task="sft", rank=1, heads=2000)  # 2000 cores of 1 > 1152
    with pytest.raises(ConfigError, match="--match comm: ravan cannot send about FedIT's 1152"):
        matched(wide, "comm")


def test_every_methods_client_side_declares_the_methods_options():
    """A method option marked ``server`` reaches ``aggregate`` through the client side's
    ``server_options`` (read from ``Client.OPTIONS``): a client class without the method's
    options silently drops them (FLoRA-NA's ``svd_error`` once did)."""
    for name in fedlora.methods.names():
        m = fedlora.methods.get(name)
        assert {o.name for o in m.client.OPTIONS} == {o.name for o in m.options}, name


def test_florana_svd_error_option_reaches_the_round_rows(tiny_bert_dir, tmp_path):
    from fedlora.simulate import SimConfig, run

    cfg = SimConfig(method="florana", model=tiny_bert_dir, clients=2, rounds=1, local_steps=1,
                    batch_size=4, max_length=16, max_test=8, rank=2, target_modules=["query"],
                    method_options={"florana_svd_error": True})  # fmt: skip
    row = run(cfg, tmp_path, progress=False, log=lambda s: None).rounds[-1]
    assert row["svd_error"] >= 0 and row["florana_fit_error"] <= row["fedit_error"] + 1e-12
