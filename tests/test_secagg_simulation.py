"""SecAgg+ on Flower's simulation engine (issue 23, item 4): 2 rounds offline of Flower's own
``SecAggPlusWorkflow`` (in a ``ServerApp`` running the legacy ``DefaultWorkflow`` with
:class:`fedlora.flower.secagg_flower.SecAggStrategy`) and ``secaggplus_mod`` (in the ClientApp),
4 simulated SuperNodes whose ClientApps run in Ray actors, through
``flwr.simulation.run_simulation``. Every round's global must equal the plain rule
(:func:`fedlora.aggregate`) on the same uploads within SecAgg's quantisation bound: the synthetic
set-up and the check are tests/secagg_setup.py's, the same as tests/test_secagg_flower.py runs on
:class:`fedlora.flower.LocalGrid` in process.

``run_simulation`` runs the ServerApp in a thread of this process, so the strategy's history is
read directly. Ray runs locally (2 CPUs, 1 per ClientApp, no GPU, no dashboard, usage stats off)
and Flower's telemetry is off: nothing leaves the machine. Each method costs a Ray start, most of
its time: measured on the project's shared 2-core CPU machine, 12-16 s per method (PreLort alone:
16-20 s of pytest wall time; all five: 68-73 s). So only :data:`SIM_DEFAULT` runs by default and
``FEDLORA_FLOWER_SIM_ALL=1`` runs every method of ``secagg.SECAGG_METHODS`` (the convention of
tests/test_flower_deployment.py's simulation-engine test).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("flwr")
sf = pytest.importorskip("fedlora.flower.secagg_flower")
from secagg_setup import NODES, check_rounds_equal_plain_aggregation, client_app, initial  # noqa: E402

from fedlora.flower import secagg  # noqa: E402

#: the method run by default; FEDLORA_FLOWER_SIM_ALL=1 runs every SecAgg method
SIM_DEFAULT = "prelort"


def _sim_methods() -> list:
    """Every SecAgg method; all but :data:`SIM_DEFAULT` skipped (before Ray starts) unless
    ``FEDLORA_FLOWER_SIM_ALL=1``."""
    every = os.environ.get("FEDLORA_FLOWER_SIM_ALL") == "1"
    why = "one Ray run per method: set FEDLORA_FLOWER_SIM_ALL=1 to run every method"
    return [
        pytest.param(m, marks=pytest.mark.skipif(m != SIM_DEFAULT and not every, reason=why))
        for m in secagg.SECAGG_METHODS
    ]


@pytest.fixture
def offline_flower(monkeypatch):
    """Ray (skip without it), offline: Flower's telemetry and update check off, Ray's usage
    stats off, a fresh local Ray instance (no ``RAY_ADDRESS``); ``PYTHONPATH`` (which Flower's
    Ray backend overwrites with this process's ``sys.path`` so that its workers import this
    test's modules) restored after, and Ray shut down."""
    ray = pytest.importorskip("ray")
    import flwr.supercore.telemetry as telemetry

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")  # read at import time
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPU: leave the env alone
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    yield
    if ray.is_initialized():  # Flower shuts Ray down at the end of a run; after a failure too
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("method", _sim_methods())
def test_two_secaggplus_rounds_on_the_simulation_engine_equal_the_plain_aggregation(
    offline_flower, method
):
    from flwr.server import ServerApp, ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    g0 = initial(method)
    keys = list(g0)
    options = {"weighting": "data"}
    strategy = sf.SecAggStrategy(
        method, keys, initial_state=g0, options=options, fraction_fit=1.0,
        min_fit_clients=NODES, min_available_clients=NODES, fraction_evaluate=0.0,
        min_evaluate_clients=0, on_fit_config_fn=lambda r: {"round": r},
    )  # fmt: skip
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=2), strategy=strategy)
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)
        )
        workflow(grid, legacy)

    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": 2,
            "num_gpus": 0,
            "include_dashboard": False,
            "object_store_memory": 100 * 2**20,  # Ray's floor is 75 MiB; the messages are KiB
        },
    }
    run_simulation(
        server_app=server_app,
        client_app=client_app(method, keys, options=options),
        num_supernodes=NODES,
        backend_config=backend_config,
    )
    check_rounds_equal_plain_aggregation(method, strategy.history)
