"""The README's test command is exactly the one CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_ci_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmd = [ln for ln in ci.splitlines() if "python -m pytest" in ln]
    assert len(ci_cmd) == 1, "CI must run one test command"
    assert ci_cmd[0].strip() in readme, "README and .ci/run disagree on the test command"
