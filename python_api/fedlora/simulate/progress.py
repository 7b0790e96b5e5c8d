"""What a person watching ``fedlora simulate`` sees while it runs: one progress bar of local
steps over the whole run (so its rate and ETA move inside each round, not only between rounds),
labelled with the round, and the per-round lines printed above it.

The engine creates one :class:`RunProgress` per run and calls :func:`tick` after every
optimizer step (one step of a batched group counts once: the clients of a group step together).
:func:`round_steps` counts the steps each round takes, from the same sampling and budgets the
engine uses, so the bar's total is exact. The bar is drawn on stderr, the round lines on stdout
(above the bar); with ``enabled=False`` the lines go to ``log`` and nothing is drawn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["RunProgress", "round_steps", "tick"]

_ACTIVE: RunProgress | None = None


def tick(steps: int = 1) -> None:
    """Advance the active run's bar by ``steps`` local steps (no-op without an active bar)."""
    if _ACTIVE is not None:
        _ACTIVE.advance(steps)


def round_steps(cfg: Any, rule: Any, budgets: list[Any]) -> list[int]:
    """Local optimizer steps of each round of ``cfg``: per client ``pre_steps + steps`` of its
    budget; the batched engine steps a round's clients together (the longest client sets the
    count), the sequential engine one after another (the counts add up)."""
    from fedlora.rounds import sample_clients

    totals = []
    for r in range(cfg.rounds):
        sampled = sample_clients(cfg.seed, r, range(cfg.clients), cfg.clients_per_round)
        per = [rule.pre_steps(budgets[k]) + budgets[k].steps for k in sampled]
        totals.append(max(per, default=0) if cfg.engine == "batched" else sum(per))
    return totals


class RunProgress:
    """The bar of one run (see the module docstring). ``steps``: :func:`round_steps`; ``start``:
    the first round to run (0-based; a resumed run starts its bar at the steps already done)."""

    def __init__(
        self,
        steps: list[int],
        start: int = 0,
        *,
        enabled: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        global _ACTIVE
        if _ACTIVE is not None:  # a run that ended by an exception left its bar
            _ACTIVE.close()
        self.steps, self.log, self.bar = list(steps), log, None
        self.rounds = len(self.steps)
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=sum(self.steps),
                initial=sum(self.steps[:start]),
                desc=self._desc(start),
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        _ACTIVE = self

    def _desc(self, r: int) -> str:
        return f"round {min(r + 1, self.rounds)}/{self.rounds}"

    def round_start(self, r: int) -> None:
        """Round ``r`` (0-based) starts: label the bar with it."""
        if self.bar is not None:
            self.bar.set_description(self._desc(r), refresh=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, line: str) -> None:
        """Print ``line`` above the bar (or to ``log`` without one)."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.log(line)

    def close(self) -> None:
        """Remove the bar; :func:`tick` is a no-op again."""
        global _ACTIVE
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if _ACTIVE is self:
            _ACTIVE = None
