"""The reference federated training loop behind ``fedlora simulate`` (DESIGN §6)."""

from fedlora.simulate.config import Budget, ConfigError, SimConfig, parse_budgets

__all__ = ["Budget", "ConfigError", "SimConfig", "parse_budgets", "run"]


def run(*args, **kwargs):
    """Run an experiment: see :func:`fedlora.simulate.engine.run`."""
    from fedlora.simulate.engine import run as _run

    return _run(*args, **kwargs)
