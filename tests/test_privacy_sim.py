"""Client-level DP through the round loops: ``fedlora simulate`` / ``compare`` flags, ε per round,
refusals with exit 2, the clip bound on the simulator path, and :class:`fedlora.rounds.Server`
with a :class:`fedlora.privacy.PrivateAggregator` (non-finite replies rejected and counted, the
accountant counting every round)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora.cli import main
from fedlora.methods import Budget, ClientOptions, names
from fedlora.rounds import Reply, Server
from fedlora.simulate import SimConfig, run
from fedlora.simulate.config import ConfigError

privacy = pytest.importorskip("fedlora.privacy")
pytest.importorskip("dp_accounting")

#: per method: the options and budgets it runs under DP with (others refuse)
RUNS = {
    "fedit": {},
    "ffa": {},
    "hetlora": {"budgets": "rank=1,2,4", "method_options": {"hetlora_weighting": "data"}},
    "prelort": {"budgets": "rank=1,2,4"},
    "flexlora": {"budgets": "rank=1,2,4"},
    "ravan": {"budgets": "heads=1,2", "head_score": "random"},
    "hafl": {"budgets": "rank=1,2,4;components=1,2,4", "hafl_mode": "truncate"},
}


U32 = 2.0**-24


def _norm(values) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in values.values()))


def tiny(tiny_bert_dir, **kw) -> SimConfig:
    base = dict(
        clients=3, rounds=2, local_steps=1, batch_size=4, max_length=16, max_test=16, rank=4,
        heads=2, lr=1e-2, model=tiny_bert_dir, target_modules=["query", "value"],
        clients_per_round=2, dp_clip=0.5, dp_noise=1.0,
    )  # fmt: skip
    base.update(kw)
    return SimConfig(**base)


@pytest.mark.parametrize("method", names())
def test_every_method_runs_under_dp_with_epsilon_or_refuses(tiny_bert_dir, tmp_path, method):
    """Each registered method either runs 2 DP rounds with ε after every round (metrics.json,
    metrics.csv's ``epsilon`` column, strictly increasing, equal to the accountant library's
    value at q = 2/3) or is refused in one line before training."""
    if method not in RUNS:
        with pytest.raises(ConfigError) as err:
            tiny(tiny_bert_dir, method=method).validate()
        assert "refused" in str(err.value) and "\n" not in str(err.value)
        return
    cfg = tiny(tiny_bert_dir, method=method, **RUNS[method])
    result = run(cfg, tmp_path, progress=False, log=lambda s: None)
    eps = [r["epsilon"] for r in result.rounds]
    want = [privacy.epsilon(k, 2 / 3, 1.0, 1e-5) for k in (1, 2)]
    assert eps == pytest.approx(want, rel=1e-12) and eps[0] < eps[1]
    assert all(r["dp_rejected"] == 0 and r["clients_used"] == 2 for r in result.rounds)
    assert all("dp_clip_fraction" not in r for r in result.rounds)  # not privatised
    rows = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["epsilon"] for r in rows] == eps
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("epsilon")
    assert [float(line.split(",")[col]) for line in lines[2:]] == pytest.approx(eps)
    for state in result.global_state.values():
        assert bool(torch.isfinite(state).all())


def test_hetlora_default_sparsity_weighting_is_refused_under_dp_and_secagg(tiny_bert_dir):
    """HetLoRA's default weighting (``sparsity``, the paper's) is data-dependent: DP and
    SecAgg refuse it in one line naming the flag, rather than silently running data weights."""
    for extra in ({}, {"secagg": True, "dp_clip": None, "dp_noise": None}):
        with pytest.raises(ConfigError) as err:
            tiny(tiny_bert_dir, method="hetlora", budgets="rank=1,2,4", **extra).validate()
        msg = str(err.value)
        assert "weighting='data'" in msg and "--hetlora-weighting data" in msg and "\n" not in msg
    tiny(tiny_bert_dir, method="hetlora", method_options={"hetlora_weighting": "data"}).validate()


def test_target_epsilon_is_reached_and_the_progress_line_shows_it(tiny_bert_dir, tmp_path, capsys):
    argv = ["simulate", "--model", tiny_bert_dir, "--out", str(tmp_path), "--clients", "3",
            "--clients-per-round", "1", "--rounds", "2", "--local-steps", "1", "--batch-size", "4",
            "--max-length", "16", "--max-test", "8", "--rank", "2", "--target-modules", "query",
            "--no-progress", "--dp-clip", "0.3", "--dp-epsilon", "5", "--dp-delta", "1e-3"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ε " in out.splitlines()[-2]
    rows = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    z = rows[0]["dp_noise_multiplier"]
    # the smallest z reaching ε = 5 (calibration tolerance 1e-4 in z): 5 is reached at z, and
    # not at a z 1% smaller
    assert privacy.epsilon(2, 1 / 3, z, 1e-3) <= 5.0 < privacy.epsilon(2, 1 / 3, 0.99 * z, 1e-3)
    assert rows[-1]["epsilon"] == pytest.approx(privacy.epsilon(2, 1 / 3, z, 1e-3), rel=1e-12)


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--dp-clip", "0", "--dp-noise", "1"], "--dp-clip must be a positive"),
        (["--dp-clip", "-1", "--dp-noise", "1"], "--dp-clip must be a positive"),
        (["--dp-clip", "1", "--dp-noise", "0"], "--dp-noise must be a positive"),
        (["--dp-clip", "1", "--dp-noise", "nan"], "--dp-noise must be a positive"),
        (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "1"], "--dp-delta must be in (0, 1)"),
        (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "0"], "--dp-delta must be in (0, 1)"),
        (["--dp-clip", "1"], "--dp-clip needs --dp-noise"),
        (["--dp-noise", "1"], "--dp-noise needs --dp-clip"),
        (["--dp-clip", "1", "--dp-noise", "1", "--dp-epsilon", "3"], "not both"),
        (["--dp-clip", "1", "--dp-epsilon", "1e-4"], "--dp-epsilon: target_epsilon"),
        (["--dp-clip", "1", "--dp-noise", "1", "--method", "flora"], "'flora' is refused"),
        (["--dp-clip", "1", "--dp-noise", "1", "--method", "fedex"], "'fedex' is refused"),
        (["--dp-clip", "1", "--dp-noise", "1", "--method", "florana"], "'florana' is refused"),
        (["--dp-clip", "1", "--dp-noise", "1", "--method", "hafl"], "hafl_mode='truncate'"),
        (
            ["--dp-clip", "1", "--dp-noise", "1", "--method", "ravan", "--head-score", "gradient"],
            "head_score 'random' or 'weight'",
        ),
        (["--dp-clip", "1", "--dp-noise", "1", "--dp-weights", "capped"], "weight_cap"),
        (
            [
                "--dp-clip",
                "1",
                "--dp-noise",
                "1",
                "--method",
                "prelort",
                "--prelort-aggregation",
                "zeropad",
            ],
            "prelort_aggregation='segment'",
        ),
        (
            [
                "--dp-clip",
                "1",
                "--dp-noise",
                "1",
                "--method",
                "hetlora",
                "--hetlora-weighting",
                "data",
                "--hetlora-prune",
            ],
            "refuses hetlora_prune",
        ),
    ],
)
def test_cli_dp_bad_input_exits_2_with_one_line(tiny_bert_dir, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    base = ["simulate", "--model", tiny_bert_dir, "--out", str(out), "--no-progress", "--rounds",
            "3", "--clients", "4", "--clients-per-round", "2"]  # fmt: skip
    code = main([*base, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and "\n" not in err, err
    assert not out.exists()


def test_compare_runs_with_dp(tiny_bert_dir, tmp_path):
    common = ["--model", tiny_bert_dir, "--clients", "2", "--rounds", "1", "--local-steps", "1",
              "--batch-size", "4", "--max-length", "16", "--max-test", "8", "--rank", "2",
              "--target-modules", "query", "--no-progress", "--dp-clip", "1", "--dp-noise", "2"]  # fmt: skip
    out = tmp_path / "c"
    assert main(["compare", "--methods", "fedit,ffa", "--out", str(out), *common]) == 0
    for m in ("fedit", "ffa"):
        rows = [json.loads(p.read_text())["rounds"] for p in (out / m).rglob("metrics.json")]
        assert rows and all(r[-1]["epsilon"] > 0 for r in rows)


def test_compare_under_dp_accounts_every_run_of_the_lr_grid_and_seeds(tiny_bert_dir, tmp_path):
    """Tuning the learning rate on the clients' data spends privacy: results.json gives one
    run's ε and ε of every run of the method composed (2 rates x 2 seeds of validation runs,
    then 2 seeds of final runs: 6 runs of 2 rounds at q = 1/2), equal to the accountant's."""
    common = ["--model", tiny_bert_dir, "--clients", "4", "--clients-per-round", "2", "--rounds",
              "2", "--local-steps", "1", "--batch-size", "4", "--max-length", "16", "--max-test",
              "8", "--rank", "2", "--target-modules", "query", "--no-progress", "--dp-clip", "1",
              "--dp-noise", "1.5", "--lr-grid", "1e-3,1e-2", "--seeds", "2"]  # fmt: skip
    out = tmp_path / "c"
    assert main(["compare", "--methods", "fedit", "--out", str(out), *common]) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["epsilon"] == pytest.approx(privacy.epsilon(2, 0.5, 1.5, 1e-5), rel=1e-12)
    assert row["dp_runs_composed"] == 6
    want = privacy.epsilon(12, 0.5, 1.5, 1e-5)
    assert row["epsilon_with_tuning"] == pytest.approx(want, rel=1e-12)
    assert want > 1.5 * row["epsilon"]
    md = (out / "results.md").read_text()
    assert f"6 runs composed: ε {want:.3g}" in md


def test_the_clip_bound_holds_on_the_simulator_path(tiny_bert_dir, monkeypatch):
    """Every client's upload reaching the server is within C of its download (the client
    clipped it), and with one client per round and a negligible noise the global moves by at
    most C over the smallest public denominator (FedIT: q·N = 1, so C itself)."""
    seen = []
    real = privacy.private_aggregate

    def spy(method, g, downloads, uploads, metas, budgets, dp, gen=None, **kw):
        out, metrics = real(method, g, downloads, uploads, metas, budgets, dp, gen, **kw)
        den = min(x for v in metrics["dp_denominators"].values() for x in v if x > 0)
        seen.append((method, dict(g), list(downloads), list(uploads), metas, budgets, out, den))
        return out, metrics

    monkeypatch.setattr(privacy, "private_aggregate", spy)
    C = 1e-3
    for method, kw in (("fedit", {}), ("prelort", {"budgets": "rank=2,4"}), ("ravan", {})):
        seen.clear()
        cfg = tiny(
            tiny_bert_dir, method=method, clients=2, clients_per_round=1, lr=0.1, dp_clip=C,
            dp_noise=1e-9, rounds=2, **kw,
        )  # fmt: skip
        run(cfg, progress=False, log=lambda s: None)
        assert len(seen) == 2
        for name, g, downs, ups, metas, budgets, out, den in seen:
            for d, u, m, b in zip(downs, ups, metas, budgets, strict=True):
                delta = privacy.client_delta(name, g, d, u, m, b)
                # the upload is download + δ rounded to float32: ≤ 2^-24·‖upload‖ off
                assert _norm(delta.values) <= C + U32 * _norm(u), name
                assert _norm(delta.values) >= 0.5 * C  # lr 0.1 moves far more: it was clipped
            ref = privacy._reference(name, g, downs, [0])
            moved = {k: out[k].double() - ref[k] for k in out if not k.endswith(".lora_s")}
            # float32 rounding of the new global, plus 6σ of the noise (std z·C per entry)
            n = sum(v.numel() for v in moved.values())
            slack = U32 * _norm(out) + 6 * 1e-9 * C * math.sqrt(n)
            # one sampled client: a covered index j moves by its clipped δ_j / den_j, so
            # ‖Δglobal‖ ≤ C / min den (fedit, ravan with every head: den = q·N = 1 exactly)
            assert _norm(moved) <= C / den + slack, name
            if name == "fedit":
                assert den == pytest.approx(1.0, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# fedlora.rounds.Server(dp=PrivateAggregator) without a model
# ------------------------------------------------------------------------------------------------

R, D = 4, 5


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x.lora_A.weight": torch.randn(R, D, generator=g),
        "x.lora_B.weight": torch.randn(D, R, generator=g),
        "head.weight": torch.randn(2, D, generator=g),
    }


def _server(method: str = "fedit", clients: int = 4, per_round: int = 2) -> Server:
    budgets = {c: Budget(rank=R, heads=1, components=R, steps=1) for c in range(clients)}
    q = per_round / clients
    dp = privacy.DPConfig(clip=1.0, noise_multiplier=0.8)
    agg = privacy.PrivateAggregator(
        method,
        dp,
        sample_rate=q,
        population=privacy.Population(list(budgets.values()), q),
        seed=3,
    )
    return Server(method, _state(0), options=ClientOptions(rank=R), budgets=budgets, dp=agg)


def test_server_rejects_a_non_finite_reply_counts_it_and_still_counts_the_round():
    server = _server()
    downloads = server.configure(0, [0, 1])
    good = {k: v + 0.1 for k, v in downloads[0].state.items()}
    bad = {k: v.clone() for k, v in downloads[1].state.items()}
    bad["x.lora_B.weight"][0, 0] = float("nan")
    outcome = server.aggregate(0, [Reply(0, good, 1.0, {}), Reply(1, bad, 1.0, {})])
    assert outcome.used == [0]
    assert [c for c, _ in outcome.rejected] == [1] and "non-finite" in outcome.rejected[0][1]
    assert outcome.metrics["dp_rejected"] == 1 and outcome.metrics["clients_used"] == 1
    assert outcome.metrics["epsilon"] == pytest.approx(privacy.epsilon(1, 0.5, 0.8, 1e-5))
    assert all(bool(torch.isfinite(v).all()) for v in server.global_state.values())
    # a round whose every reply is rejected (non-finite) still spends privacy
    server.configure(1, [2, 3])
    outcome = server.aggregate(1, [Reply(2, bad, 1.0, {}), Reply(3, bad, 1.0, {})])
    assert outcome.state is None and outcome.metrics["dp_rejected"] == 2
    assert outcome.metrics["epsilon"] == pytest.approx(privacy.epsilon(2, 0.5, 0.8, 1e-5))
    # ... and so does a round in which no reply reaches the aggregation at all
    server.configure(2, [0, 1])
    outcome = server.aggregate(2, [Reply(9, good, 1.0, {})])
    assert outcome.state is None
    assert outcome.metrics["epsilon"] == pytest.approx(privacy.epsilon(3, 0.5, 0.8, 1e-5))
    assert server.dp.accountant.rounds == 3


def test_server_dp_equals_private_aggregate_on_the_same_inputs():
    """The Server path is private_aggregate with each client's real download and budget, and
    the noise seeded by (seed, round): the same numbers when called directly."""
    server = _server(per_round=3)
    g0 = dict(server.global_state)
    downloads = server.configure(5, [0, 2, 3])
    ups = {c: {k: v + 0.3 * (c + 1) for k, v in d.state.items()} for c, d in downloads.items()}
    outcome = server.aggregate(5, [Reply(c, ups[c], 1.0, {}) for c in (0, 2, 3)])
    from fedlora.seeding import key

    gen = torch.Generator().manual_seed(key(3, 5, privacy.NOISE_TAG))
    want, _ = privacy.private_aggregate(
        "fedit", g0, [downloads[c].state for c in (0, 2, 3)], [ups[c] for c in (0, 2, 3)],
        [{}] * 3, [downloads[c].budget for c in (0, 2, 3)], server.dp.dp, gen,
        population=server.dp.population,
    )  # fmt: skip
    for k, v in want.items():
        assert torch.equal(outcome.state[k], v), k


def test_local_client_clips_its_upload(tiny_bert_dir):
    """LocalClient.train(dp_clip=C): the upload's delta from the download has joint norm ≤ C
    and the pre-clip norm is reported."""
    import fedlora
    from fedlora.local import LocalClient
    from fedlora.simulate.tasks import get_task

    cfg = tiny(tiny_bert_dir, method="fedit", lr=0.1)
    task = get_task("classify")
    dataset = task.load_data(cfg)
    rule = fedlora.methods.get("fedit").client(cfg.client_options(), [])
    model, tok = task.build_model(cfg, dataset, 1, rule, None)
    data = task.encode(tok, dataset.train, cfg)
    from fedlora.state_dict import get_adapter_state_dict

    down = get_adapter_state_dict(model, slot=0)
    client = LocalClient("fedit", model, loss=task, lr=0.1, side=rule)
    budget = Budget(rank=4, heads=2, components=4, steps=2)
    res = client.train(down, budget, [data.take([0, 1, 2, 3])] * 2, seed=1, dp_clip=1e-3)
    delta = privacy.client_delta("fedit", down, down, res.state, res.meta)
    assert res.metrics["update_norm"] > 1e-3
    assert _norm(delta.values) <= 1e-3 + U32 * _norm(res.state)


def test_dp_fields_at_their_defaults_keep_old_fingerprints_and_resume_counts_on(
    tiny_bert_dir, tmp_path
):
    """A config without DP has the fingerprint it had before the DP fields existed (old
    checkpoints still resume); a resumed DP run's accountant starts after the checkpointed
    rounds (the same ε and the same numbers as one straight run), and a different noise
    multiplier is refused."""
    plain = tiny(tiny_bert_dir, dp_clip=None, dp_noise=None)
    assert "dp_" not in plain.fingerprint()
    assert "dp_clip" in tiny(tiny_bert_dir).fingerprint()
    straight = run(tiny(tiny_bert_dir), tmp_path / "a", progress=False, log=lambda s: None)
    run(tiny(tiny_bert_dir, rounds=1), tmp_path / "b", progress=False, log=lambda s: None)
    resumed = run(
        tiny(tiny_bert_dir), tmp_path / "b", resume=True, progress=False, log=lambda s: None
    )
    assert [r["epsilon"] for r in resumed.rounds] == [r["epsilon"] for r in straight.rounds]
    for k, v in straight.global_state.items():
        assert torch.equal(v, resumed.global_state[k]), k
    with pytest.raises(ConfigError, match="different config"):
        run(tiny(tiny_bert_dir, dp_noise=2.0, rounds=3), tmp_path / "b", resume=True,
            progress=False, log=lambda s: None)  # fmt: skip
    # a target ε resolved for another --rounds (left out of the fingerprint) changes z: refused
    from fedlora.simulate import privacy_run
    from fedlora.simulate.config import parse_budgets

    cfg = tiny(tiny_bert_dir)
    with pytest.raises(ConfigError, match="noise multiplier 2"):
        privacy_run.aggregator(cfg, parse_budgets(cfg), [1.0] * 3, [{"dp_noise_multiplier": 2.0}])


def test_flower_strategy_runs_client_level_dp_and_reports_epsilon():
    """FedLoRAStrategy(dp=PrivateAggregator): the Message-API strategy aggregates through
    Server(dp=): a NaN reply is rejected and counted, ε is in the round's MetricRecord."""
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, Message
    from flwr.clientapp import ClientApp

    import fedlora.flower as ff

    g0 = _state(0)
    budgets = [Budget(rank=R, heads=1, components=R, steps=1)] * 3
    agg = privacy.PrivateAggregator(
        "fedit",
        privacy.DPConfig(clip=1.0, noise_multiplier=0.8),
        sample_rate=1.0,
        population=privacy.Population(budgets, 1.0),
        seed=3,
    )
    strategy = ff.FedLoRAStrategy(
        "fedit", initial_state=g0, client_options=ClientOptions(rank=R), dp=agg,
        fraction_evaluate=0.0, min_available_nodes=3,
    )  # fmt: skip
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        state = ff.from_arrayrecord(msg.content["arrays"])
        up = {k: v + 0.05 * (pid + 1) for k, v in state.items()}
        if pid == 2:
            up["x.lora_A.weight"][0, 0] = float("nan")
        return ff.train_reply(msg, up, 1, meta={})

    grid = ff.LocalGrid(app, 3)
    messages = strategy.configure_train(1, ff.to_arrayrecord(g0), ConfigRecord(), grid)
    arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert arrays is not None
    assert metrics["epsilon"] == pytest.approx(privacy.epsilon(1, 1.0, 0.8, 1e-5))
    assert metrics["num_rejected"] == 1 and metrics["dp_rejected"] == 1
    with pytest.raises(TypeError, match=r"dp must be a fedlora\.privacy\.PrivateAggregator"):
        ff.FedLoRAStrategy("fedit", dp=privacy.DPConfig(clip=1.0, noise_multiplier=1.0))
