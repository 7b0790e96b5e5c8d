"""A command a person can watch (issue 19, item 4): ``fedlora --version``, every option's default
in ``--help``, a line saying what a run loads, a progress bar that moves with every local step,
and a process that ends right after ``done``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
import torch

import fedlora
from fedlora.cli import _progress_logs, build_parser, main
from fedlora.methods import get as get_method
from fedlora.simulate import SimConfig, parse_budgets, run
from fedlora.simulate import progress as progress_mod

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    from fedlora.testing import random_causal_lm

    return str(random_causal_lm(tmp_path_factory.mktemp("tiny-llama") / "model"))


TINY = [
    "--task", "sft", "--clients", "3", "--rounds", "2", "--local-steps", "2",
    "--batch-size", "3", "--max-length", "48", "--max-test", "6", "--max-generate", "1",
    "--max-new-tokens", "3", "--rank", "4", "--device", "cpu",
]  # fmt: skip


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedlora {fedlora.__version__}"


def _option_blocks(help_text: str) -> dict[str, str]:
    """``{option: its help text}`` from an argparse help page."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and stripped:
            current = stripped.split()[0].rstrip(",")
            blocks[current] = stripped
        elif current is not None and line.startswith("    ") and stripped:
            blocks[current] += " " + stripped
        elif not stripped:
            current = None
    return blocks


@pytest.mark.parametrize("command", ["simulate", "compare", "export"])
def test_every_option_shows_its_default_in_help(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._actions[-1])))
    page = sub.choices[command].format_help()
    blocks = _option_blocks(page)
    options = [
        a.option_strings[0]
        for a in sub.choices[command]._actions
        if a.option_strings and a.option_strings[0] != "-h"
    ]
    assert options and set(options) <= set(blocks), (set(options) - set(blocks), page)
    missing = [o for o in options if "default" not in blocks[o] and "(required)" not in blocks[o]]
    assert not missing, missing
    # a default None is said in words, never printed as "None"
    assert "default: None" not in page


def test_round_steps_count_what_the_engines_step(tiny_lm):
    for engine in ("batched", "sequential"):
        cfg = SimConfig(task="sft", model=tiny_lm, clients=5, clients_per_round=3, rounds=3,
                        budgets="steps=1,2,4", engine=engine)  # fmt: skip
        budgets = parse_budgets(cfg)
        rule = get_method(cfg.method).client(cfg.client_options(), budgets)
        from fedlora.simulate.engine import sample_clients

        want = []
        for r in range(cfg.rounds):
            steps = [budgets[k].steps for k in sample_clients(cfg, r)]
            want.append(max(steps) if engine == "batched" else sum(steps))
        assert progress_mod.round_steps(cfg, rule, budgets) == want


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_the_bar_moves_with_every_local_step(tiny_lm, monkeypatch, capsys, engine):
    """One tick per optimizer step, inside the rounds (not only between them), adding up to
    the bar's total; the bar is labelled with the round."""
    ticks: list[tuple[str, int]] = []
    real_advance = progress_mod.RunProgress.advance

    def spy(self, steps=1):
        ticks.append((self.bar.desc.rstrip(": "), int(self.bar.n)))
        real_advance(self, steps)

    monkeypatch.setattr(progress_mod.RunProgress, "advance", spy)
    cfg = SimConfig(task="sft", model=tiny_lm, clients=3, rounds=2, local_steps=3, batch_size=3,
                    max_length=48, max_test=6, max_generate=0, rank=4, device="cpu",
                    engine=engine)  # fmt: skip
    torch.set_num_threads(1)
    run(cfg, None, progress=True, log=lambda line: None)
    per_round = 3 if engine == "batched" else 9
    assert [n for _, n in ticks] == list(range(2 * per_round))
    assert [d for d, _ in ticks] == ["round 1/2"] * per_round + ["round 2/2"] * per_round
    err = capsys.readouterr().err
    assert f"{2 * per_round}/{2 * per_round}" in err and "step" in err
    assert progress_mod._ACTIVE is None


def test_cli_logs_go_to_stdout_while_a_command_runs(capsys):
    log = logging.getLogger("fedlora.models")
    root = logging.getLogger("fedlora")
    level, handlers = root.level, list(root.handlers)
    with _progress_logs():
        log.info("building the cache")
        log.warning("a warning")
    log.info("not shown after the command")
    out, err = capsys.readouterr()
    assert out == "fedlora: building the cache\n"
    assert err == "a warning\n"
    assert root.level == level and root.handlers == handlers


def test_cli_says_what_it_loads_and_exits_right_after_done(tiny_lm, tmp_path):
    """The console script's process: its first line names the model and data; it ends within
    two seconds of printing ``done`` (CPython's finalization, a full garbage collection and a
    teardown of every module, took 4.3 s here under load before the CLI skipped it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-m", "fedlora.cli", "simulate", *TINY, "--model", tiny_lm,
            "--out", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    lines = []
    done_at = None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("done:"):
            done_at = time.monotonic()
            break
    rest = proc.stdout.read()
    code = proc.wait(timeout=120)
    ended = time.monotonic()
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    assert done_at is not None, lines
    assert "loading model" in lines[0] and tiny_lm in lines[0] and "arithmetic" in lines[0]
    assert not rest.strip()
    assert ended - done_at < 2.0, f"the process lived {ended - done_at:.1f} s after done"
