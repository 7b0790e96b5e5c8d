"""The GPU benchmark scripts on the CPU: arguments, suite discovery, loud failures, result files.

``bench/gpu.py --dry-run`` runs every suite at tiny shapes (on the CPU with the torch backend and
the Triton interpreter where there is no GPU), so a script that would break on the GPU machine,
where time is scarce, breaks here first.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python_api")])}
    return subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def gpu():
    """``bench/gpu.py`` imported as a module (it puts ``bench/`` on ``sys.path`` itself, for this
    module's tests only)."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("bench_gpu_script", BENCH / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = saved


def test_help_and_list():
    help_ = _script("gpu.py", "--help")
    assert help_.returncode == 0, help_.stderr
    assert "--dry-run" in help_.stdout and "--list" in help_.stdout
    listed = _script("gpu.py", "--list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["masked:", "ok", "multihead:", "ok", "masked_mean:", "ok"]
    assert _script("simulate_speed.py", "--help").returncode == 0


def test_dry_run_runs_every_suite_and_writes_results(tmp_path):
    out = tmp_path / "dry.json"
    proc = _script("gpu.py", "--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    for key in ("date", "device", "torch", "python", "protocol"):
        assert key in results
    assert "dry run" in results["protocol"] and "failures" not in results
    benches = {row["bench"] for row in results["rows"]}
    assert benches == {"multihead_lora", "masked_weighted_mean", "masked_lora", "masked_adamw_"}
    masked = [r for r in results["rows"] if r["bench"] == "masked_lora"]
    assert masked[0]["impl"] == "F.linear" and masked[0]["fwd_x_floor"] == 1.0
    impls = {r["impl"] for r in masked}
    assert {"fedlora all-trainable", "fedlora half-frozen", "peft LoRA module"} <= impls
    assert any("grad_x_all" in r for r in masked)  # the backward-only rows ran too
    mh = {r["impl"] for r in results["rows"] if r["bench"] == "multihead_lora"}
    assert {"F.linear", "fedlora", "fedlora (base_out)"} <= mh


def test_a_suite_that_fails_to_import_fails_the_run(gpu, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(gpu.SUITES, "broken", "no_such_bench_module:suite")
    assert gpu.main(["--list"]) == 1
    captured = capsys.readouterr()
    assert "broken: import error" in captured.out
    assert "suite broken failed to import" in captured.err
    assert "ModuleNotFoundError" in captured.err

    out = tmp_path / "r.json"
    argv = ["--dry-run", "--only", "broken", "--only", "masked_mean", "--out", str(out)]
    assert gpu.main(argv) == 1
    captured = capsys.readouterr()
    assert "ModuleNotFoundError" in captured.err and "FAILED suites: ['broken']" in captured.err
    results = json.loads(out.read_text())  # the suites that did import still report
    assert "no_such_bench_module" in results["failures"]["broken"]
    assert {r["bench"] for r in results["rows"]} == {"masked_weighted_mean"}


def test_a_suite_that_raises_fails_the_run_after_the_others(gpu, monkeypatch, tmp_path, capsys):
    def raises(run):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(gpu.SUITES, "raises", raises)
    out = tmp_path / "r.json"
    argv = ["--dry-run", "--only", "raises", "--only", "masked_mean", "--out", str(out)]
    assert gpu.main(argv) == 1
    assert "RuntimeError: kernel exploded" in capsys.readouterr().err
    results = json.loads(out.read_text())
    assert "kernel exploded" in results["failures"]["raises"]
    assert results["rows"]


def test_a_time_limit_keeps_the_suites_measured_before_it(gpu, monkeypatch, tmp_path, capsys):
    """gpu_all.sh stops a step with SIGINT at its limit: the suites measured before the
    interrupted one are in the results file (written after every suite), marked incomplete."""

    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setitem(gpu.SUITES, "interrupted", interrupted)
    out = tmp_path / "r.json"
    argv = ["--dry-run", "--only", "masked_mean", "--only", "interrupted", "--out", str(out)]
    assert gpu.main(argv) == 1
    results = json.loads(out.read_text())
    assert results["complete"] is False and "interrupted" in results["failures"]["interrupted"]
    assert {r["bench"] for r in results["rows"]} == {"masked_weighted_mean"}
    assert gpu.main(["--dry-run", "--only", "masked_mean", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["complete"] is True


def test_without_cuda_every_suite_says_it_is_skipped(gpu, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    assert gpu.main(["--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    skipped = [line for line in lines if "skipped: no CUDA device" in line]
    assert [line.split()[1] for line in skipped] == list(gpu.SUITES)
    assert not out.exists()


def test_result_files(gpu, tmp_path):
    import _timing  # on sys.path since bench/gpu.py was imported

    assert _timing.device_slug("NVIDIA H200 (SXM)") == "nvidia-h200-sxm"
    assert _timing.results_path("NVIDIA H200", prefix="simulate-", suffix="-c4").name == (
        "simulate-nvidia-h200-c4.json"
    )
    env = _timing.environment("cpu", rows=[1])
    path = _timing.write_results(env, tmp_path / "sub" / "x.json")
    assert json.loads(path.read_text()) == env


def test_sft_speed_scripts_run_end_to_end_on_a_tiny_model(tmp_path):
    """The SFT steps of bench/gpu_all.sh (simulate_speed.py --task sft, sft_throughput.py) at
    tiny sizes: both engines agree, every row is timed, and the result files hold the numbers."""
    sim = tmp_path / "sim.json"
    proc = _script(
        "simulate_speed.py", "--task", "sft", "--random-tiny", "--device", "cpu",
        "--clients", "3", "--rounds", "1", "--local-steps", "1", "--batch-size", "2",
        "--max-length", "64", "--max-test", "4", "--max-generate", "0", "--out", str(sim),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(sim.read_text())
    assert rows and "batched" in json.dumps(rows) and "sequential" in json.dumps(rows)
    tp = tmp_path / "tp.json"
    proc = _script("sft_throughput.py", "--tiny", "--warmup", "1", "--steps", "2", "--out", str(tp))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = tp.read_text()
    for row in ("ours", "peft", "frozen_floor"):
        assert row in text, row


def _gpu_all(tmp_path, **env):
    out = tmp_path / "out"
    full_env = {
        **os.environ,
        "DRY_RUN": "1",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "TMPDIR": str(tmp_path),
        **env,
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_all.sh")],
        capture_output=True, text=True, env=full_env, timeout=600, cwd=ROOT,
    )  # fmt: skip
    return proc, out / "bench-results"


@pytest.mark.slow
def test_gpu_all_dry_run_runs_the_quick_pass_into_out(tmp_path):
    """``DRY_RUN=1 bash bench/gpu_all.sh`` on the CPU: the quick pass (goal bench, readiness
    tests, SFT step) runs at tiny sizes and every result lands in ``$OUT/bench-results``, the
    folder the GPU tool brings back."""
    proc, res = _gpu_all(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    goal = json.loads((res / "gpu-goal.json").read_text())
    assert goal["rows"] and "dry run" in goal["protocol"] and goal["complete"] is True
    assert {r["bench"] for r in goal["rows"]} >= {"masked_lora", "multihead_lora"}
    assert "ours" in json.loads((res / "sft-throughput.json").read_text())["rows"]
    for name in ("goal", "tests", "sft"):
        assert (res / f"gpu_all-{name}.log").stat().st_size > 0, name
    assert "gpu_all (quick): exit 0" in proc.stdout


def test_gpu_all_plan_fits_the_device_budget():
    """The step limits of each phase fit its TOTAL, and the plan (start + both calls) stays
    within 10 minutes of device time."""
    import re

    text = (BENCH / "gpu_all.sh").read_text()
    totals = dict(re.findall(r"^\s+(quick|full)\) TOTAL=\$\{TOTAL:-(\d+)\}", text, re.M))
    assert int(totals["quick"]) <= 240  # the quick pass: at most 4 minutes
    body = text.split('if [ "$PHASE" = quick ]; then', 1)[1]
    quick_part, full_part = body.split("\nelse\n", 1)
    for part, total in ((quick_part, totals["quick"]), (full_part, totals["full"])):
        # simulate-classify runs only where the MiniLM wheel is installed (not on the GPU
        # machine) and gets what is left of the budget
        steps = re.findall(r"^\s+step ([\w-]+) (\d+) ", part, re.M)
        limits = [int(s) for name, s in steps if name != "simulate-classify"]
        assert limits and sum(limits) <= int(total), (limits, total)
    start_s = 90
    assert start_s + int(totals["quick"]) + int(totals["full"]) <= 600


def test_gpu_all_refuses_an_unknown_phase(tmp_path):
    proc, _ = _gpu_all(tmp_path, PHASE="everything")
    assert proc.returncode == 2 and "PHASE must be quick or full" in proc.stderr


def test_sft_throughput_saves_partial_rows_every_round(gpu):
    """bench/sft_throughput.py hands every round of steps to a saver (partial rows survive a
    time limit), filling the caller's dicts in place."""
    spec = importlib.util.spec_from_file_location("bench_sft_tp", BENCH / "sft_throughput.py")
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)
    seen, timed, loads = [], {}, []

    def on_round():
        seen.append({k: len(v["seconds"]) for k, v in timed.items()})

    steps = {"a": lambda: 1.0, "b": lambda: 2.0}
    tp.time_rows(steps, torch.device("cpu"), 1, 3, on_round, timed, loads)
    assert seen == [{"a": 0, "b": 0}, {"a": 1, "b": 1}, {"a": 2, "b": 2}, {"a": 3, "b": 3}]
    assert timed["b"]["losses"] == [2.0] * 4 and len(loads) == 4
