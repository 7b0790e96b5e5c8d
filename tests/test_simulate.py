"""``fedlora simulate``: engines agree, resume is exact, every method runs, bad input exits 2."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.cli import main
from fedlora.simulate import SimConfig, parse_budgets, run
from fedlora.simulate.config import METHODS, ConfigError


def tiny(tiny_bert_dir, **kw) -> SimConfig:
    base = dict(
        clients=3, rounds=2, local_steps=2, batch_size=4, max_length=16, max_test=48, rank=4,
        heads=2, lr=1e-2, model=tiny_bert_dir, target_modules=["query", "value", "dense"],
    )  # fmt: skip
    base.update(kw)
    return SimConfig(**base)


def _states_close(a, b, rel=1e-3):
    """Equal up to float summation order: Adam turns ~1e-7 gradient differences of near-zero
    gradients into ~lr-sized steps on single elements, so compare against each tensor's scale."""
    assert a.keys() == b.keys()
    for k in a:
        scale = float(a[k].abs().max()) + 1e-8
        err = float((a[k] - b[k]).abs().max())
        assert err <= rel * scale, f"{k}: max difference {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize(
    "method,budgets,extra",
    [("fedit", "uniform", {}), ("hetlora", "rank=1,2,4;steps=2,1", {}),
     ("prelort", "rank=1,2,4", {}), ("hafl", "components=1,2,4", {}),
     ("hafl", "rank=1,2,4;components=1,2,4", {"hafl_mode": "truncate", "rounds": 3}),
     ("ravan", "heads=1,2", {})],
    ids=["fedit", "hetlora", "prelort", "hafl", "hafl-truncate", "ravan"],
)  # fmt: skip
def test_batched_engine_equals_sequential(tiny_bert_dir, method, budgets, extra):
    kw = dict(method=method, budgets=budgets, **extra)
    seq = run(tiny(tiny_bert_dir, engine="sequential", **kw), progress=False)
    bat = run(tiny(tiny_bert_dir, engine="batched", **kw), progress=False)
    for r_s, r_b in zip(seq.rounds, bat.rounds, strict=True):
        for key in ("test_accuracy", "test_loss", "train_loss", "bytes_up", "bytes_down"):
            assert r_s[key] == pytest.approx(r_b[key], rel=1e-4, abs=1e-5), key
    _states_close(seq.global_state, bat.global_state)
    # training did something: the adapter left its initial state and the loss is finite
    assert all(torch.isfinite(torch.tensor(r["test_loss"])) for r in bat.rounds)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_two_rounds(tiny_bert_dir, method, tmp_path):
    cfg = tiny(tiny_bert_dir, method=method, budgets="hetero", engine="batched")
    result = run(cfg, tmp_path / method, progress=False)
    assert [r["round"] for r in result.rounds] == [1, 2]
    for r in result.rounds:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["aggregation_error"] == r["aggregation_error"]  # reported, not NaN
    for name in ("metrics.json", "metrics.csv", "curves.png", "checkpoint.safetensors"):
        assert (tmp_path / method / name).stat().st_size > 0
    rows = json.loads((tmp_path / method / "metrics.json").read_text())["rounds"]
    assert len(rows) == 2
    # the adapters themselves trained (not only the head): B factors / Ravan cores left zero
    # (BERT's pooler is unused by mean pooling, so its adapter rightly gets no gradient)
    trained = [
        v
        for k, v in result.global_state.items()
        if k.endswith((".lora_B.weight", ".lora_H")) and ".pooler." not in k
    ]
    if method == "flora":  # FLoRA merges each round's stack into the base and restarts B at 0
        from safetensors.torch import load_file

        ckpt = load_file(str(tmp_path / method / "checkpoint.safetensors"))
        assert any(k.endswith(".base_layer.weight") for k in ckpt)
        assert all(v.abs().sum() == 0 for v in trained)
    else:
        assert trained and all(v.abs().sum() > 0 for v in trained), "an adapter never trained"


@pytest.mark.parametrize("mode", ["freeze", "truncate"])
def test_resume_continues_to_the_same_numbers(tiny_bert_dir, tmp_path, mode):
    # truncation: the server's scores of round 1 choose round 2's components, so a resumed run
    # must get them back from the checkpoint (the rounds' rows record them)
    kw = dict(method="hafl", hafl_mode=mode, budgets="rank=1,2,4;components=1,2,4")
    full = run(tiny(tiny_bert_dir, rounds=3, **kw), tmp_path / "full", progress=False)
    run(tiny(tiny_bert_dir, rounds=1, **kw), tmp_path / "part", progress=False)
    resumed = run(
        tiny(tiny_bert_dir, rounds=3, **kw), tmp_path / "part", resume=True, progress=False
    )
    assert [r["test_loss"] for r in resumed.rounds] == pytest.approx(
        [r["test_loss"] for r in full.rounds], rel=1e-6
    )
    _states_close(full.global_state, resumed.global_state, rel=1e-6)


def test_out_dir_of_another_run_is_refused(tiny_bert_dir, tmp_path):
    run(tiny(tiny_bert_dir, rounds=1), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="already holds this run"):
        run(tiny(tiny_bert_dir, rounds=1), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="different config"):
        run(tiny(tiny_bert_dir, rounds=1, lr=0.5), tmp_path, resume=True, progress=False)


def test_budget_spec_parsing():
    cfg = SimConfig(clients=4, rank=8, heads=4, local_steps=5, budgets="rank=2,8;steps=3")
    b = parse_budgets(cfg)
    assert [x.rank for x in b] == [2, 8, 2, 8] and [x.steps for x in b] == [3, 3, 3, 3]
    assert [x.heads for x in parse_budgets(SimConfig(clients=3, heads=4, budgets="hetero"))] == [
        1,
        2,
        4,
    ]
    for spec, words in [("rank=2,x", "must be integers"), ("depth=3", "cannot parse"),
                        ("rank=16", "exceeds the global rank"), ("heads=9", "exceeds the --heads")]:  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            parse_budgets(SimConfig(budgets=spec))


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--method", "fedavg"], "--method must be one of"),
        (["--budgets", "rank=1;;bogus"], "--budgets: cannot parse"),
        (["--budgets", "rank=99"], "exceeds the global rank"),
        (["--clients", "0"], "--clients must be a positive integer"),
        (["--engine", "parallel"], "--engine must be one of"),
        (["--hafl-mode", "prune"], "--hafl-mode"),
        (["--target-modules", "nothing_like_this"], "--target-modules"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tiny_bert_dir, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    code = main(["simulate", "--model", tiny_bert_dir, "--out", str(out), "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and "\n" not in err, err
    assert not out.exists()


def test_cli_bad_data_file(tiny_bert_dir, tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("text,topic\nhello,a\nworld,b\n")
    code = main(
        [
            "simulate",
            "--model",
            tiny_bert_dir,
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--data" in err and "label" in err


def test_cli_runs_and_compares(tiny_bert_dir, tmp_path, capsys):
    common = ["--model", tiny_bert_dir, "--clients", "2", "--rounds", "1", "--local-steps", "1",
              "--batch-size", "4", "--max-length", "16", "--max-test", "16", "--rank", "2", "--no-progress"]  # fmt: skip
    assert main(["simulate", "--method", "ffa", "--out", str(tmp_path / "s"), *common]) == 0
    assert "final test accuracy" in capsys.readouterr().out
    assert (
        main(["compare", "--methods", "fedit,florana", "--out", str(tmp_path / "c"), *common]) == 0
    )
    table = (tmp_path / "c" / "results.md").read_text()
    assert "| fedit |" in table and "| florana |" in table
    assert (tmp_path / "c" / "curves.png").stat().st_size > 0


def test_base_merge_keys_match_the_server_rules():
    from fedlora.methods._common import SERVER_SUFFIXES
    from fedlora.state_dict import BASE_MERGE_SUFFIXES

    assert {s for pair in BASE_MERGE_SUFFIXES for s in pair} == set(SERVER_SUFFIXES)


def test_ffa_uploads_only_b(tiny_bert_dir):
    ffa = run(tiny(tiny_bert_dir, method="ffa", rounds=1), progress=False)
    fedit = run(tiny(tiny_bert_dir, method="fedit", rounds=1), progress=False)
    up_ffa, up_fedit = ffa.rounds[0]["bytes_up"], fedit.rounds[0]["bytes_up"]
    assert up_ffa < 0.75 * up_fedit  # A (d_in x R per layer) stays home
    assert any(k.endswith(".lora_A.weight") for k in ffa.global_state)  # the global keeps A


def test_hafl_truncation_follows_the_server_scores(tiny_bert_dir):
    """--hafl-mode truncate: from round 2, a rank-r_k client holds the top-r_k components by the
    server's averaged scores of the round before (recorded in each round's row)."""
    from fedlora.methods import hafl

    cfg = tiny(tiny_bert_dir, method="hafl", hafl_mode="truncate", rounds=2,
               budgets="rank=1,2,4;components=1,2,4")  # fmt: skip
    result = run(cfg, progress=False)
    scores = result.rounds[0]["scores"]
    assert scores and all(len(v) == 4 for v in scores.values())
    rule = hafl.METHOD.client(cfg.client_options(), parse_budgets(cfg))
    assert rule.after_aggregate(result.rounds[0])["prev_scores"].keys() == scores.keys()
    down = rule.download(result.global_state, parse_budgets(cfg)[1])
    for path, s in scores.items():
        idx = hafl.top_components(s, 4, 2)
        assert torch.equal(
            down[f"{path}.lora_A.weight"], result.global_state[f"{path}.lora_A.weight"][idx]
        )
    # the ranking is not the prefix everywhere: the scores really choose
    assert any(hafl.top_components(s, 4, 2) != [0, 1] for s in scores.values())


def test_ravan_upload_shrinks_with_the_head_budget(tiny_bert_dir):
    """Only the trained heads' s·H travel (DESIGN §4): 1 head of 4 sends a quarter of the cores
    (the classifier head, sent whole by every client, is the rest)."""
    from fedlora.methods.prefix import nbytes

    kw = dict(method="ravan", rounds=1, heads=4, rank=4)
    one = run(tiny(tiny_bert_dir, budgets="heads=1", **kw), progress=False)
    four = run(tiny(tiny_bert_dir, budgets="heads=4", **kw), progress=False)
    head = sum(nbytes({k: v}) for k, v in one.global_state.items() if "classifier" in k)
    cores_one = one.rounds[0]["bytes_up"] - 3 * head
    cores_four = four.rounds[0]["bytes_up"] - 3 * head
    h_bytes = sum(v.numel() * 4 for k, v in one.global_state.items() if k.endswith(".lora_H"))
    s_bytes = sum(v.numel() * 4 for k, v in one.global_state.items() if k.endswith(".lora_s"))
    assert cores_four == 3 * h_bytes  # every head: H only (s folded in), 3 clients
    assert cores_one == 3 * h_bytes // 4
    assert cores_one < (cores_four + 3 * s_bytes) / 4  # below a quarter of the old full upload
