"""``fedlora compare --task sft``: the same review protocol as classify (DESIGN §6.2) on a causal
LM, ranked by ROUGE-L (perplexity and exact match beside it), on the tiny random LLaMA."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora.cli import main
from fedlora.simulate import compare as cmp
from fedlora.simulate.compare import CompareSpec, compare, matched, paired, split_validation
from fedlora.simulate.config import ConfigError, SimConfig

SFT = ["--task", "sft", "--clients", "2", "--local-steps", "1", "--batch-size", "4",
       "--max-length", "48", "--rank", "4", "--max-generate", "2", "--max-new-tokens", "3",
       "--no-progress"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on 2 shared cores, two spinning threads make the tiny model's
    evaluation two orders of magnitude slower (8 s instead of 0.05 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _questions(split) -> set[str]:
    from fedlora.data import to_chat_messages

    return {to_chat_messages(ex, include_response=False)[-1]["content"] for ex in split}


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_validation_of_instruction_data_is_carved_from_train_by_prompt():
    from fedlora.data import InstructionDataset, build_arithmetic
    from fedlora.data.instructions import prompt_key

    ds = build_arithmetic(per_category=40)
    tune, final = split_validation(ds, 0.2)
    assert isinstance(tune, InstructionDataset) and isinstance(final, InstructionDataset)
    key = lambda split: {prompt_key(ex) for ex in split}
    val = key(tune.test)
    assert val and val <= key(ds.train) and not val & key(ds.test)
    assert not val & key(final.train) and key(final.test) == key(ds.test)
    assert key(tune.train) == key(final.train) and len(final.test) == len(ds.test)
    assert 0.1 < len(val) / len(ds.train) < 0.3
    assert tune.category_names == ds.category_names and tune.info["validation_fraction"] == 0.2
    again, _ = split_validation(ds, 0.2)  # a stable hash: the same part every time
    assert key(again.test) == val


def test_comm_matching_reads_the_llm_hidden_size_without_weights(tiny_llm_dir, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("matching must not load model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    # embedded SmolLM2: hidden 576; FedIT sends 4 * 2 * 576 per layer, Ravan 2 r^2 -> r = 48
    emb = SimConfig(task="sft", method="ravan", rank=4, heads=2)
    assert matched(emb, "comm").rank == 48
    tiny = SimConfig(task="sft", method="ravan", rank=4, heads=2, model=tiny_llm_dir)
    assert matched(tiny, "comm").rank == 11  # hidden 32: sqrt(4 * 64 / 2) = 11.3
    ffa = SimConfig(task="sft", method="ffa", rank=4, model=tiny_llm_dir)
    assert matched(ffa, "comm").rank == 8


def test_sft_compare_ranks_by_rouge_with_lr_on_validation_and_prefixes(tiny_llm_dir, tmp_path):
    from fedlora.data import load_instructions

    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "fedit,prelort", "--model", tiny_llm_dir, "--out", str(out),
            "--seeds", "2", "--lr-grid", "0.01,0.05", "--baseline", "fedit", "--target", "0.5",
            "--budgets", "rank=2,4", "--rounds", "2", *SFT]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["task"] == "sft" and data["metric"] == data["ranked_by"] == "rouge_l"
    assert data["higher_is_better"] is True and data["ranking_note"] is None
    rows = {r["method"]: r for r in data["rows"]}
    ds = load_instructions("arithmetic")
    train_q, test_q = _questions(ds.train), _questions(ds.test)
    for method in ("fedit", "prelort"):
        row = rows[method]
        val = {}
        for lr in (0.01, 0.05):
            scores = []
            for seed in (0, 1):  # validation scores averaged over the seeds
                run_dir = out / method / f"tune-lr{lr:g}-seed{seed}"
                last = json.loads((run_dir / "metrics.json").read_text())["rounds"][-1]
                scores.append(last["rouge_l"])
                asked = {s["question"] for s in _jsonl(run_dir / "samples.jsonl")}
                assert asked and asked <= train_q and not asked & test_q  # validation, not test
            val[lr] = sum(scores) / 2
        assert data["lr_scores"][method] == {f"{lr:g}": v for lr, v in val.items()}
        assert row["lr"] == max(val, key=lambda lr: (val[lr], -lr))
        finals = [
            json.loads((out / method / f"seed{s}" / "metrics.json").read_text())["rounds"][-1]
            for s in (0, 1)
        ]
        for s in (0, 1):
            asked = {x["question"] for x in _jsonl(out / method / f"seed{s}" / "samples.jsonl")}
            assert asked and asked <= test_q
        assert row["final_rouge_l"] == pytest.approx(sum(f["rouge_l"] for f in finals) / 2)
        assert row["final_perplexity"] == pytest.approx(
            sum(f["test_perplexity"] for f in finals) / 2
        )
        assert row["final_exact_match"] == pytest.approx(sum(f["exact_match"] for f in finals) / 2)
        assert math.isfinite(row["initial_rouge_l"]) and row["seeds"] == 2
        assert row["seeds_reaching_target"] in (0, 1, 2)
        assert "samples" not in data["rounds"][method][0][-1]  # kept in samples.jsonl only
    v = rows["prelort"]["vs_baseline"]
    assert len(v["per_seed"]) == 2 and v["verdict"] and "vs_baseline" not in rows["fedit"]
    assert set(data["prefix_rouge_l"]) == {"prelort"}  # the prefix method, evaluated per rank
    assert set(data["prefix_rouge_l"]["prelort"][0]) == {"2", "4"}
    full = data["prefix_metrics"]["prelort"][0]["4"]
    assert full["test_perplexity"] == pytest.approx(
        json.loads((out / "prelort" / "seed0" / "metrics.json").read_text())["rounds"][-1][
            "test_perplexity"
        ],
        rel=1e-4,
    )  # rank R is the global model itself
    md = (out / "results.md").read_text()
    for words in ("final ROUGE-L", "final test perplexity", "final exact match",
                  "round 0 ROUGE-L", "Validation ROUGE-L", "Paired per-seed differences of final "
                  "ROUGE-L", "Rounds to ROUGE-L 0.5", "rank 2:", "| prelort |"):  # fmt: skip
        assert words in md, words
    assert "fedlora compare --methods fedit,prelort" in md
    assert (
        (out / "results.csv")
        .read_text()
        .startswith("method,lr,budget,seeds,final_rouge_l,final_rouge_l_std,best_rouge_l")
    )
    assert (out / "curves.png").stat().st_size > 0


def test_without_generation_compare_ranks_by_test_loss_and_says_so(tiny_llm_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "fedit,hetlora", "--model", tiny_llm_dir, "--out", str(out),
            "--seeds", "2", "--baseline", "fedit", "--budgets", "rank=2,4", "--rounds", "1",
            "--max-test", "24", *SFT, "--max-generate", "0"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["metric"] == "rouge_l" and data["ranked_by"] == "test_loss"
    assert data["higher_is_better"] is False and "--max-generate 0" in data["ranking_note"]
    rows = {r["method"]: r for r in data["rows"]}
    assert math.isfinite(rows["fedit"]["final_loss"]) and "final_loss_std" in rows["fedit"]
    assert math.isnan(rows["fedit"]["final_rouge_l"])
    assert set(data["prefix_loss"]["hetlora"][0]) == {"2", "4"}
    md = (out / "results.md").read_text()
    assert "ranked and paired by test loss" in md and "lower is better" in md
    assert "--max-generate 0" in md and "final ROUGE-L" not in md
    assert "final test perplexity" in md


def test_paired_verdict_follows_the_direction_of_the_metric():
    lower = [-0.05, -0.051, -0.049]
    assert paired(lower)["verdict"].startswith("worse")
    assert paired(lower, higher_is_better=False)["verdict"].startswith("better")
    assert paired([0.1, math.nan])["verdict"] == "undefined (NaN)"


def test_lr_is_chosen_by_validation_rouge(tmp_path, monkeypatch, tiny_llm_dir):
    """Fake runs: validation ROUGE-L favours 0.05 while the test split would favour 0.01."""
    from fedlora.data import load_instructions
    from fedlora.simulate.engine import RunResult

    train_q = _questions(load_instructions("arithmetic").train)
    seen = []

    def fake_run(cfg, out_dir, *, shared, **kwargs):
        test = shared["dataset"].test
        tuning = _questions(test) <= train_q
        seen.append((cfg.method, cfg.lr, cfg.seed, tuning))
        good = (cfg.lr == 0.05) == tuning
        row = {"test_perplexity": 9.0, "test_loss": 2.2, "rouge_l": 0.4 if good else 0.1,
               "exact_match": 0.0, "aggregation_error": 0.0, "bytes_up": 8, "seconds": 0.1}  # fmt: skip
        if cfg.method == "ffa" and not tuning:
            row["rouge_l"] += 0.01 * (cfg.seed + 1)
        return RunResult(cfg, [{"round": 1, **row}], {}, {**row, "rouge_l": 0.0})

    monkeypatch.setattr(cmp, "run", fake_run)
    configs = [SimConfig(task="sft", method=m, model=tiny_llm_dir) for m in ("fedit", "ffa")]
    spec = CompareSpec(seeds=(0, 1), lr_grid=(0.01, 0.05), baseline="fedit")
    rows = {r["method"]: r for r in compare(configs, tmp_path / "c", spec=spec, progress=False)}
    assert rows["fedit"]["lr"] == rows["ffa"]["lr"] == 0.05
    assert [s for s in seen if s[3]] == [  # every seed tunes: the scores are averaged
        (m, lr, seed, True) for m in ("fedit", "ffa") for lr in (0.01, 0.05) for seed in (0, 1)
    ]
    assert rows["ffa"]["vs_baseline"]["per_seed"] == pytest.approx([0.01, 0.02])
    assert rows["ffa"]["final_rouge_l"] == pytest.approx(0.1 + 0.015)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--target", "2"], "--target must be a ROUGE-L in (0, 1]"),
        (["--target", "0.5", "--max-generate", "0"], "--target"),
        (["--baseline", "ravan"], "--baseline"),
        (["--lr-grid", "0.01", "--val-fraction", "0.9"], "--val-fraction"),
        (["--match", "trainable"], "--match"),
    ],
)
def test_bad_sft_compare_options_exit_2_before_anything_runs(
    tiny_llm_dir, tmp_path, capsys, extra, words
):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "fedit,hetlora", "--model", tiny_llm_dir, "--out", str(out),
            *SFT, *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_methods_of_one_comparison_share_their_task(tmp_path):
    configs = [SimConfig(task="sft", method="fedit"), SimConfig(method="hetlora")]
    with pytest.raises(ConfigError, match="--task"):
        compare(configs, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
