"""Tasks are found through a registry that owns their defaults and checks (issue 17 item 5)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedlora.simulate import SimConfig
from fedlora.simulate.config import ConfigError
from fedlora.simulate.tasks import _REGISTRY as REGISTRY
from fedlora.simulate.tasks import TaskSpec, get_task, register_task, task_names, task_spec

ROOT = Path(__file__).resolve().parents[1] / "python_api" / "fedlora"


def test_the_built_in_tasks_and_their_defaults():
    assert task_names()[:2] == ("classify", "sft")
    for name in ("classify", "sft"):
        spec = task_spec(name)
        cfg = SimConfig(task=name)
        for field, value in spec.defaults.items():
            assert getattr(cfg, field) == value, (name, field)
        assert get_task(name).name == name and get_task(name).primary in (spec.metric, "rouge_l")
    with pytest.raises(ValueError, match="task must be one of classify, sft"):
        task_spec("nope")


@pytest.fixture
def toy_task():
    spec = register_task(
        TaskSpec(
            name="toy",
            factory="fedlora.simulate.tasks.classify:ClassifyTask",
            summary="a registered task of the tests",
            defaults={"lr": 0.0123, "max_length": 17, "max_test": 5, "target_modules": ["query"]},
            metric="test_accuracy",
            metric_label="toy accuracy",
            embedded_model="the toy model",
            embedded_data="the toy data",
        )
    )
    yield spec
    del REGISTRY["toy"]


def test_a_registered_task_is_a_choice_everywhere(toy_task, capsys):
    """Defaults, validation, the CLI's --task choices and its start line come from the spec."""
    from fedlora.cli import _start_line, build_parser

    cfg = SimConfig(task="toy").validate()
    assert (cfg.lr, cfg.max_length, cfg.max_test, cfg.target_modules) == (0.0123, 17, 5, ["query"])
    args = build_parser().parse_args(["simulate", "--task", "toy"])
    assert args.task == "toy"
    assert "the toy model" in _start_line(cfg, "out") and "the toy data" in _start_line(cfg, "out")
    # a task that is not a causal LM refuses the LLM-only options
    with pytest.raises(ConfigError, match="--system-prompt applies to --task sft only"):
        SimConfig(task="toy", system_prompt="hi").validate()


def test_no_task_names_are_compared_outside_the_registry():
    """cli.py, config.py and compare.py ask the registry, never `task == "sft"`."""
    pattern = re.compile(r"""task\s*[!=]=\s*["'](classify|sft)["']""")
    for rel in ("cli.py", "simulate/config.py", "simulate/compare.py"):
        text = (ROOT / rel).read_text()
        assert not pattern.search(text), rel
