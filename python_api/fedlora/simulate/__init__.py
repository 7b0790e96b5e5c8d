"""The reference federated training loop behind ``fedlora simulate`` (DESIGN §6)."""

from fedlora.simulate.config import Budget, ConfigError, SimConfig, parse_budgets

__all__ = ["Budget", "ConfigError", "RunSetup", "SimConfig", "parse_budgets", "run", "setup_run"]


def run(*args, **kwargs):
    """Run an experiment: see :func:`fedlora.simulate.engine.run`."""
    from fedlora.simulate.engine import run as _run

    return _run(*args, **kwargs)


def setup_run(*args, **kwargs):
    """Build a run's data, model and partition: see :func:`fedlora.simulate.setup.setup_run`."""
    from fedlora.simulate.setup import setup_run as _setup_run

    return _setup_run(*args, **kwargs)


def __getattr__(name: str):
    if name == "RunSetup":
        from fedlora.simulate.setup import RunSetup

        return RunSetup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
