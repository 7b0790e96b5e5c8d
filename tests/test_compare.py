"""``fedlora compare`` as DESIGN §6.2 describes: seeds, learning rate chosen on validation, paired
differences against a baseline, matched budgets, rounds to target, rank-prefix evaluation."""

from __future__ import annotations

import json
import math
import tomllib

import pytest
import torch

from fedlora.cli import main
from fedlora.simulate.compare import CompareSpec, matched, paired, split_validation
from fedlora.simulate.config import ConfigError, SimConfig

COMMON = ["--clients", "2", "--rounds", "2", "--local-steps", "1", "--batch-size", "4",
          "--max-length", "16", "--rank", "4", "--no-progress"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: two spinning threads on 2 shared cores slow tiny models down a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_paired_statistics_on_known_numbers():
    # differences 0.02, 0.04, 0.06: mean 0.04, sd 0.02, t = 0.04 / (0.02 / sqrt 3) = 3.46
    v = paired([0.02, 0.04, 0.06])
    assert v["mean"] == pytest.approx(0.04) and v["std"] == pytest.approx(0.02)
    assert v["t"] == pytest.approx(0.04 / (0.02 / math.sqrt(3)))
    assert v["verdict"].startswith("within noise")  # 3.46 < t(0.975, 2) = 4.30
    assert paired([0.05, 0.051, 0.049, 0.05])["verdict"].startswith("better")
    assert paired([-0.05, -0.051, -0.049])["verdict"].startswith("worse")
    assert paired([0.1])["verdict"] == "one seed: no test"


def test_validation_is_carved_from_train_and_disjoint_from_test():
    from fedlora.data import build_stdlib_topics

    ds = build_stdlib_topics()
    tune, final = split_validation(ds, 0.1)
    val = set(tune.test.texts)
    assert val and val <= set(ds.train.texts) and not val & set(ds.test.texts)
    assert not val & set(final.train.texts) and set(final.test.texts) == set(ds.test.texts)
    assert set(tune.train.texts) == set(final.train.texts)
    assert 0.05 < len(val) / len(ds.train.texts) < 0.15


def test_budgets_matched_on_communication(tiny_bert_dir):
    base = SimConfig(model=tiny_bert_dir, rank=4, heads=2)
    # hidden 32: FedIT sends R (d_in + d_out) = 4 * 64 per layer; Ravan h r^2 = 2 r^2 -> r = 11
    assert matched(SimConfig(**{**base.__dict__, "method": "ravan"}), "comm").rank == 11
    assert matched(SimConfig(**{**base.__dict__, "method": "ffa"}), "comm").rank == 8
    assert matched(SimConfig(**{**base.__dict__, "method": "hetlora"}), "comm").rank == 4


def test_compare_with_seeds_lr_grid_baseline_and_prefixes(tiny_bert_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "fedit,hetlora", "--model", tiny_bert_dir, "--out", str(out),
            "--seeds", "2", "--lr-grid", "0.01,0.05", "--baseline", "fedit", "--target", "0.05",
            "--budgets", "rank=2,4", *COMMON]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["task"] == "classify" and data["metric"] == data["ranked_by"] == "test_accuracy"
    # the resolved options (compare's own ones too), and each run's own configuration
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["methods"] == "fedit,hetlora" and resolved["lr-grid"] == "0.01,0.05"
    assert tomllib.loads((out / "hetlora" / "seed1" / "config.toml").read_text())["seed"] == 1
    rows = {r["method"]: r for r in data["rows"]}
    for method in ("fedit", "hetlora"):
        # the chosen lr is the grid entry with the best final validation accuracy, averaged
        # over the seeds (DESIGN §6.2)
        val = {
            lr: sum(
                json.loads((out / method / f"tune-lr{lr:g}-seed{s}" / "metrics.json").read_text())[
                    "rounds"
                ][-1]["test_accuracy"]
                for s in (0, 1)
            )
            / 2
            for lr in (0.01, 0.05)
        }
        assert rows[method]["lr"] == max(val, key=lambda lr: (val[lr], -lr))
        assert data["lr_scores"][method] == {f"{lr:g}": v for lr, v in val.items()}
        finals = [
            json.loads((out / method / f"seed{s}" / "metrics.json").read_text())["rounds"][-1][
                "test_accuracy"
            ]
            for s in (0, 1)
        ]
        assert rows[method]["final_accuracy"] == pytest.approx(sum(finals) / 2)
        assert rows[method]["seeds"] == 2 and "rounds_to_target" in rows[method]
        assert 0 <= rows[method]["initial_accuracy"] <= 1  # round 0, before training
    v = rows["hetlora"]["vs_baseline"]
    assert len(v["per_seed"]) == 2 and "vs_baseline" not in rows["fedit"]
    assert set(data["prefix_accuracy"]) == {"hetlora"}  # a prefix method, evaluated per rank
    assert set(data["prefix_accuracy"]["hetlora"][0]) == {"2", "4"}
    md = (out / "results.md").read_text()
    assert "| fedit |" in md and "Paired per-seed differences" in md and "rank 2:" in md
    assert all(r["passes_per_round"] == 2 for r in data["rows"])  # 2 clients x 1 local step
    assert "final test accuracy" in md and "Validation accuracy" in md and "\\|t\\|" in md
    assert "fedlora compare --methods fedit,hetlora" in md
    assert (out / "results.csv").read_text().startswith("method,lr,budget,seeds")
    assert (out / "curves.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--seeds", "0"], "--seeds"),
        (["--seeds", "1,1"], "repeats"),
        (["--lr-grid", ","], "--lr-grid"),
        (["--lr-grid", "0.01,-1"], "--lr-grid"),
        (["--lr-grid", "fast"], "--lr-grid"),
        (["--baseline", "ravan"], "--baseline"),
        (["--match", "trainable"], "--match"),
        (["--target", "2"], "--target"),
        (["--lr-grid", "0.01", "--val-fraction", "0.9"], "--val-fraction"),
    ],
)
def test_bad_compare_options_exit_2_before_anything_runs(
    tiny_bert_dir, tmp_path, capsys, extra, words
):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "fedit,hetlora", "--model", tiny_bert_dir, "--out", str(out),
            *COMMON, *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_spec_check_is_the_api_contract():
    with pytest.raises(ConfigError, match="--seeds"):
        CompareSpec(seeds=()).check(["fedit"])
    CompareSpec(seeds=(0, 3), lr_grid=(0.01,), baseline="fedit", match="comm").check(["fedit"])
