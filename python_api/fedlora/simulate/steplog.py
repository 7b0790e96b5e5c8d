"""Per-step logs of a run: ``steps.csv`` and ``--report-to tensorboard``.

Each round's row holds every client's training loss per local step (``step_losses``, a dict
from client id to a list, recorded by the engine from :attr:`fedlora.local.LocalResult.
step_losses`). :func:`write_steps` turns the rows into ``steps.csv`` (rewritten whole and
atomically after every round, so a resumed run's file always matches its checkpoint):

    round,step,client,train_loss

one line per client and local step, and one ``client = mean`` line per step with the mean over
the clients that trained at that step (the round mean). :class:`TensorBoardLog` writes the same
per-step scalars, every numeric per-round metric and the SFT samples (as text) to
``OUT/tensorboard`` through ``torch.utils.tensorboard`` (the ``tensorboard`` package, the
optional ``[tensorboard]`` extra).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STEPS_CSV = "steps.csv"
TENSORBOARD_DIR = "tensorboard"
STEPS_COLUMNS = ("round", "step", "client", "train_loss")


def step_rows(rounds: list[dict[str, Any]]) -> list[tuple[int, int, str, float]]:
    """``(round, step, client, loss)`` for every client and local step (1-based steps) of
    ``rounds``, followed per step by ``(round, step, "mean", mean over clients)``."""
    out: list[tuple[int, int, str, float]] = []
    for row in rounds:
        per_client = row.get("step_losses") or {}
        steps = max((len(v) for v in per_client.values()), default=0)
        for s in range(steps):
            values = []
            for client in sorted(per_client, key=int):
                losses = per_client[client]
                if s < len(losses):
                    out.append((int(row["round"]), s + 1, str(client), float(losses[s])))
                    values.append(float(losses[s]))
            out.append((int(row["round"]), s + 1, "mean", sum(values) / len(values)))
    return out


def write_steps(out: Path, rounds: list[dict[str, Any]]) -> None:
    """``OUT/steps.csv`` from the rounds' ``step_losses`` (see the module docstring), written
    atomically; nothing when no round recorded per-step losses."""
    from fedlora.simulate.outputs import _atomic_write

    rows = step_rows(rounds)
    if not rows:
        return
    lines = [",".join(STEPS_COLUMNS)] + [f"{r},{s},{c},{v!r}" for r, s, c, v in rows]
    _atomic_write(out / STEPS_CSV, lambda p: Path(p).write_text("\n".join(lines) + "\n"))


def mean_step_losses(rounds: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """``(x, loss)`` of the round-mean training loss per step, ``x`` in rounds (round ``r``'s
    step ``s`` of ``S`` at ``r - 1 + s / S``): the train-loss panel of curves.png."""
    xs, ys = [], []
    by_round: dict[int, list[tuple[int, float]]] = {}
    for r, s, c, v in step_rows(rounds):
        if c == "mean":
            by_round.setdefault(r, []).append((s, v))
    for r, pts in by_round.items():
        n = max(s for s, _ in pts)
        for s, v in pts:
            xs.append(r - 1 + s / n)
            ys.append(v)
    return xs, ys


class TensorBoardLog:
    """``--report-to tensorboard``: per-step training losses (``train/loss_step`` the round
    mean, ``train_client/<id>`` each client; the global step counts local steps over the run),
    every numeric metric of a round (``round/<name>``, step = round) and the SFT samples
    (``samples``, a Markdown table per round)."""

    def __init__(self, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(out) / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.path))

    def log_round(self, row: dict[str, Any], first_step: int) -> int:
        """Log one round's row; its local steps are numbered from ``first_step``; returns the
        global step after them."""
        w = self.writer
        steps = 0
        for _r, s, c, v in step_rows([row]):
            tag = "train/loss_step" if c == "mean" else f"train_client/{c}"
            w.add_scalar(tag, v, first_step + s)
            steps = max(steps, s)
        rnd = int(row["round"])
        for name, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or name == "round":
                continue
            if not math.isnan(float(value)):
                w.add_scalar(f"round/{name}", float(value), rnd)
        samples = row.get("samples") or []
        if samples:
            lines = ["| prompt | answer | reference |", "|---|---|---|"]
            for sample in samples:
                cells = [
                    json.dumps(str(sample.get(k, "")))[1:-1]
                    for k in ("prompt", "answer", "reference")
                ]
                lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            w.add_text("samples", "\n".join(lines), rnd)
        w.flush()
        return first_step + steps

    def close(self) -> None:
        self.writer.close()
