"""The one error type of ``fedlora simulate`` and ``fedlora compare`` (imported by every module
of the simulator, importing none of them)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run (the CLI prints it on one line and exits with code 2)."""
