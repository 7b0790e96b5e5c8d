"""``SlotAdamW``, kept here for older imports: it lives in :mod:`fedlora.optim`."""

from fedlora.optim import SlotAdamW

__all__ = ["SlotAdamW"]
