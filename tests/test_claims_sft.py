"""``bench/claims_sft.sh`` at tiny size: ``DRY_RUN=1`` prints every ``fedlora compare`` of the
LLM claims study and its time estimate; each command then passes every check ``fedlora compare
--dry-run`` makes (options the methods take, budgets, matched communication, run directories)
on the tiny random LLaMA, so the multi-hour study cannot fail on a typo hours in. The table
script turns real (tiny) HAFL aggregation runs into verdict rows."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from fedlora.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path: Path, model: str, **knobs: str) -> tuple[list[list[str]], str]:
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "claims"), "SEEDS": "2",
           "ROUNDS": "1", "CLIENTS": "4", "STEPS": "1", "MAXLEN": "32", "RANKS": "1,2,4,8",
           "R": "8", "MODEL": model, "LR_GRID": "1e-3,3e-3,1e-2,3e-2", "BATCH": "2",
           "MAX_TEST": "4", "MAX_GENERATE": "0", **knobs}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "claims_sft.sh")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    return cmds, proc.stdout


def test_claims_sft_dry_run_commands_all_pass_compares_checks(tmp_path, tiny_llm_dir, capsys):
    cmds, text = _dry_run(tmp_path, tiny_llm_dir)
    names = [c[c.index("--out") + 1].rsplit("/", 1)[-1] for c in cmds]
    for tag in ("iid", "noniid"):
        for claim in ("prelort", "hafl", "haflt", "haflagg", "haflzp", "ravan"):
            assert f"{claim}-{tag}" in names
    # FLoRA-NA runs in Ravan's comparison (one FedIT for both): fedit,ravan,florana
    assert all("florana" in c[c.index("--methods") + 1] for c in cmds if "ravan-" in c[-1])
    # runs = methods x seeds x (grid + 1), or x 1 at a fixed lr; x 1 round x 150 s
    assert "estimate: 208 training runs x 1 rounds x 150 s" in text, text
    for cmd in cmds:
        assert cmd[:2] == ["fedlora", "compare"]
        capsys.readouterr()
        assert main([*cmd[1:], "--dry-run"]) == 0, capsys.readouterr().err
        plan = [x for x in capsys.readouterr().out.splitlines() if x.startswith("plan: ")]
        assert len(plan) == len(cmd[cmd.index("--methods") + 1].split(","))
    assert not (tmp_path / "claims").exists()  # a dry run writes nothing


def test_claims_sft_without_a_grid_runs_each_method_once_per_seed(tmp_path, tiny_llm_dir, capsys):
    """``LR_GRID=none``: every method at its registry rate, HAFL freezing's run doubles as the
    adaptive-aggregation run (no haflagg command), ``SETTINGS=noniid`` only; every command
    passes compare's checks."""
    cmds, text = _dry_run(tmp_path, tiny_llm_dir, LR_GRID="none", SETTINGS="noniid")
    names = [c[c.index("--out") + 1].rsplit("/", 1)[-1] for c in cmds]
    assert names == ["prelort-noniid", "hafl-noniid", "haflt-noniid", "haflzp-noniid",
                     "ravan-noniid"]  # fmt: skip
    assert all("--lr-grid" not in c for c in cmds)
    assert "estimate: 18 training runs x 1 rounds x 150 s" in text, text
    for cmd in cmds:
        assert main([*cmd[1:], "--dry-run"]) == 0, capsys.readouterr().err


def test_claims_table_turns_tiny_hafl_runs_into_verdicts(tmp_path, tiny_llm_dir):
    out = tmp_path / "claims"
    common = ["--task", "sft", "--model", tiny_llm_dir, "--seeds", "2", "--rounds", "1",
              "--clients", "2", "--local-steps", "1", "--batch-size", "2", "--max-length", "32",
              "--max-test", "4", "--max-generate", "0", "--rank", "4",
              "--budgets", "rank=2,4;components=2,4", "--lr", "0.05", "--no-progress"]  # fmt: skip
    assert main(["compare", "--methods", "hafl", *common, "--out", str(out / "haflagg-iid")]) == 0
    zp = ["--hafl-aggregation", "zeropad", "--out", str(out / "haflzp-iid")]
    assert main(["compare", "--methods", "hafl", *common, *zp]) == 0
    spec = importlib.util.spec_from_file_location("claims_table", ROOT / "bench/claims_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    text = table.sft_table(out)
    row = next(x for x in text.splitlines() if x.startswith("| HAFL (2)") and "IID |" in x)
    assert "AUC of test_loss per round, adaptive − zero-padding" in row
    assert row.rstrip("|").split("|")[-1].strip() in ("reproduced", "within noise",
                                                      "not reproduced")  # fmt: skip
    assert "| PreLort | IID | — | — | not run |" in text  # what did not run says so
    assert "rounds to test_loss" in text


@pytest.mark.parametrize("knob", ["SEEDS=x", "BATCH=0", "SETTINGS=both"])
def test_claims_sft_refuses_a_bad_knob_before_running(tmp_path, knob):
    key, value = knob.split("=")
    env = {**os.environ, "DRY_RUN": "1", key: value, "OUT": str(tmp_path / "c")}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "claims_sft.sh")], capture_output=True,
                          text=True, env=env, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 2 and key in proc.stderr
