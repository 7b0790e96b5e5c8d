"""Flower's deployment engine on localhost: a SuperLink, two SuperNodes, ``flwr run``.

The processes are the real Flower 1.42 executables (``flower-superlink``, ``flower-supernode``,
``flwr``), insecure mode, on free local ports, with their own ``FLWR_HOME`` (a temporary
directory holding the SuperLink connection in ``config.toml``); nothing leaves the machine.
Runtime dependency installation is off (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``):
the app runs in this environment, which has fedlora installed. Each SuperNode declares its
budget with ``--node-config "... budget-rank=r"``, as examples/flower/README.md documents.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return str(path)


def _wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"flower-superlink exited ({proc.returncode}):\n{log.read_text()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        time.sleep(0.2)
    raise AssertionError(f"flower-superlink not healthy after {timeout}s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    """End a process we started (and its process group: it runs in its own session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def deployment(tmp_path):
    """A running SuperLink and two SuperNodes; yields ``(environment, connection name, logs)``."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    link = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-deployment"\n\n'
        f'[superlink.local-deployment]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        logs.append(log)
        with open(log, "w") as out:
            proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append(proc)
        return proc

    try:
        superlink = start(
            "superlink",
            [_exe("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link)],
        )
        _wait_healthy(link, superlink, logs[0])
        for pid, rank in ((0, 2), (1, 4)):
            start(
                f"supernode-{pid}",
                [
                    _exe("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    f"partition-id={pid} num-partitions=2 budget-rank={rank}",
                ],
            )
        yield env, "local-deployment", logs
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.mark.slow
def test_superlink_two_supernodes_flwr_run_two_rounds(deployment, tiny_bert_dir, tmp_path):
    env, connection, logs = deployment
    result_file = tmp_path / "result.pt"
    overrides = (
        "num-server-rounds=2 num-nodes=2 method='hetlora' rank=4 local-steps=2 batch-size=8 "
        f"max-length=32 max-per-class=12 max-test=24 lr=0.01 model-path='{tiny_bert_dir}' "
        f"result-file='{result_file}'"
    )
    run = subprocess.run(
        [_exe("flwr"), "run", str(APP), connection, "--stream", "--run-config", overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    output = run.stdout + run.stderr
    if run.returncode != 0 or not result_file.exists():
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
        pytest.fail(f"flwr run failed ({run.returncode}):\n{output[-4000:]}\n{tails}")
    assert "round 2:" in output
    saved = torch.load(result_file, weights_only=False)
    for rnd in (1, 2):
        metrics = saved["train_metrics"][rnd]
        assert metrics["clients_used"] == 2 and metrics["num_rejected"] == 0, metrics
    # each SuperNode declared the budget of its --node-config; the server followed it
    assert sorted(b["rank"] for b in saved["declared_budgets"].values()) == [2, 4]
    final = saved["global_state"]
    trained = [k for k in final if k.endswith(".lora_B.weight") and final[k].abs().max() > 0]
    assert trained, "no adapter changed"  # B starts at 0: a non-zero B was trained
    assert all(torch.isfinite(v).all() for v in final.values())
