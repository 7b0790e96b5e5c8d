"""Result rows of the GPU benchmark scripts, saved as they come (GPU minutes are scarce).

A suite calls :func:`emit` for every finished row: the row is printed and handed to the sinks
``bench/gpu.py`` installs (:func:`sink`), which append it to the results and rewrite the results
file at once, so a run cut short by its time limit keeps every row measured before the cut.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from _timing import fmt_row

_SINKS: list[Callable[[dict], None]] = []


def emit(row: dict) -> dict:
    """Print ``row`` and pass it to every installed sink; returns it."""
    print(fmt_row(row), flush=True)
    for fn in _SINKS:
        fn(row)
    return row


@contextlib.contextmanager
def sink(fn: Callable[[dict], None]) -> Iterator[None]:
    """Within the block, every emitted row is also given to ``fn``."""
    _SINKS.append(fn)
    try:
        yield
    finally:
        _SINKS.remove(fn)
