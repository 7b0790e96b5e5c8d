"""Seeds of every random choice of a run, keyed by (seed, round, client, purpose): the one rule
the simulator, :mod:`fedlora.local`, :mod:`fedlora.rounds` and the Flower apps share.

Both engines draw the same batches, initialisations and samples because each choice is seeded
by a hash of what it is for, never by the order in which the engine happens to make it.
"""

from __future__ import annotations


def key(*parts: int) -> int:
    """A 31-bit seed from integers (FNV-1a over their low 32 bits): stable across runs,
    machines and Python versions."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % 2**61
    return h % 2**31
