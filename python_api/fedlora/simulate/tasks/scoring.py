"""Scores of generated answers: ROUGE-L (the ``rouge-score`` package) and exact match.

Both compare one generated answer with one reference and are averaged over the scored prompts.

- **ROUGE-L** is the F-measure of the longest common subsequence of the two token sequences, as
  ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])`` computes it (lower-cased, non-alphanumeric
  characters as separators, no stemming): the metric OpenFedLLM and FlowerTune report.
- **Exact match** is 1 when the two texts are equal after :func:`normalize_answer` (case,
  surrounding whitespace and quotes, inner runs of whitespace, a final ``.``/``!``/``?``), else 0;
  for the arithmetic set, whose answers are one integer, it is the answer's correctness.
  A data set with its own verifier (``InstructionDataset.scorer``, e.g. reasoning-gym's
  per-task ``score_answer``) scores exact match instead: an answer counts when its verifier
  gives it the full score 1.0 (the verifiers parse the answer as their task needs: a number,
  a list, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

_WS = re.compile(r"\s+")
_ROUGE_HINT = "pip install rouge-score (or 'fedlora-kernels[llm]')"


def normalize_answer(text: str) -> str:
    """``text`` lower-cased, with whitespace collapsed and surrounding quotes and a final
    ``.``, ``!`` or ``?`` removed, in either order: ``'  "42." '``, ``'"42".'`` and ``'42'``
    normalise alike."""
    t = _WS.sub(" ", text).strip().lower()
    while True:  # until stable: a period outside the quotes hides them from one pass
        s = t.strip("\"'`").rstrip(".!?").strip()
        if s == t:
            return t
        t = s


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when ``prediction`` equals ``reference`` after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_available() -> str | None:
    """Why ROUGE-L cannot be computed (``rouge-score`` does not import), or None if it can."""
    try:
        import rouge_score  # noqa: F401
    except ImportError as err:
        return f"{err}; `{_ROUGE_HINT}`"
    return None


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``reference`` in [0, 1]."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def verified(score: float) -> float:
    """1.0 when a verifier's ``score`` is the full score 1.0, else 0.0 (a NaN counts as 0)."""
    return float(score >= 1.0)


def score_answers(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    scorer: Callable[[str, Mapping[str, Any]], float] | None = None,
    examples: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """Mean ROUGE-L and exact match over paired answers (NaN for an empty list). With a
    ``scorer`` (the data set's verifier, called as ``scorer(prediction, example)`` on the
    paired ``examples``), exact match is the share of answers it gives the full score."""
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must pair up, got {len(predictions)} and {len(references)}"
        )
    if scorer is not None and (examples is None or len(examples) != len(predictions)):
        raise ValueError("a scorer needs the examples paired with the predictions")
    if not predictions:
        return {"rouge_l": float("nan"), "exact_match": float("nan")}
    n = len(predictions)
    pairs = list(zip(predictions, references, strict=True))
    if scorer is not None:
        em = sum(verified(scorer(p, ex)) for p, ex in zip(predictions, examples, strict=True))
    else:
        em = sum(exact_match(p, r) for p, r in pairs)
    return {"rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n, "exact_match": em / n}
