"""The run's seed rule, kept here for older imports: it lives in :mod:`fedlora.seeding`."""

from fedlora.seeding import key

__all__ = ["key"]
