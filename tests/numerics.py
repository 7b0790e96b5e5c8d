"""Tolerances derived from the numerics, not from one machine (DESIGN §7).

Two float32 evaluations of the same function (a merged and an unmerged adapter, our layer and
PEFT's) differ by rounding, and how much depends on the BLAS of the machine: a fixed ``atol``
that holds on one CPU fails on another. The rule used here is the one FlashAttention's tests use:
evaluate the function once more in float64 (the oracle) and require that the evaluation under
test is at most ``factor`` times as far from the oracle as a plain float32 evaluation of the same
function on the same machine. The bound scales with the machine's own rounding, and a real bug
(an adapter merged twice, a wrong scale) is orders of magnitude above it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

EPS32 = torch.finfo(torch.float32).eps


def float64_oracle(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output evaluated in float64: adapters merged into the base weights first
    (``merge_and_unload`` for PEFT models), so only plain torch layers run in double."""
    m = copy.deepcopy(model)
    if hasattr(m, "merge_and_unload"):
        m = m.merge_and_unload()
    m = m.double()
    with torch.no_grad():
        return _output(m(**batch))


def _output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_as_accurate(
    got: torch.Tensor,
    plain: torch.Tensor,
    oracle: torch.Tensor,
    *,
    factor: float = 4.0,
    what: str = "output",
) -> None:
    """``got`` (float32) is within ``factor`` times the float32 rounding error of ``plain`` (a
    plain float32 evaluation of the same function) from the float64 ``oracle``.

    The floor is at least a few float32 ulps of the output's magnitude, so a plain evaluation
    that happens to be exact does not make the bound zero; the oracle itself must be close to
    ``plain`` (relative 1e-3), so a wrong oracle cannot loosen the test.
    """
    oracle = oracle.double()
    scale = float(oracle.abs().max())
    floor = float((plain.double() - oracle).abs().max())
    assert floor <= 1e-3 * max(scale, 1.0), (
        f"the float64 oracle disagrees with the plain float32 {what} by {floor:.3g}: not an "
        "oracle of the same function"
    )
    tol = factor * max(floor, 4 * EPS32 * scale)
    err = float((got.double() - oracle).abs().max())
    assert err <= tol, (
        f"{what}: max |got - float64 oracle| = {err:.3g} exceeds {factor}x the plain float32 "
        f"error {floor:.3g} (tolerance {tol:.3g})"
    )
