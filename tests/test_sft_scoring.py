"""Scores of generated answers (``fedlora.simulate.tasks.scoring``): ROUGE-L and exact match
against examples worked by hand, the answer normalisation, and the bad-input errors.

ROUGE-L is the F-measure of the longest common subsequence (LCS) of the two token sequences:
``P = LCS / len(prediction)``, ``R = LCS / len(reference)``, ``F = 2PR / (P + R)``; rouge-score
lower-cases and splits on every non-alphanumeric character, and no stemming is done.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("rouge_score")

from fedlora.simulate.tasks.scoring import (
    exact_match,
    normalize_answer,
    rouge_l,
    score_answers,
)

# Exact fractions: the F-measure of small integer counts, compared to a float ulp or so.
ULP = 1e-12


@pytest.mark.parametrize(
    "prediction,reference,expected",
    [
        # 6 and 6 tokens; LCS "the cat on the mat" = 5: P = R = 5/6, F = 5/6
        ("the cat sat on the mat", "the cat lay on the mat", 5 / 6),
        # a prefix: LCS 2, P = 2/2, R = 2/6 = 1/3, F = 2 * 1 * (1/3) / (4/3) = 1/2
        ("the cat", "the cat sat on the mat", 1 / 2),
        # the other way round: P and R swap, F is the same 1/2
        ("the cat sat on the mat", "the cat", 1 / 2),
        # no stemming: "kill" != "killed"; LCS "police the gunman" = 3 of 4 and 4: F = 3/4
        ("police kill the gunman", "police killed the gunman", 3 / 4),
        # order matters (a subsequence, not a bag): LCS "police killed" (or "the gunman") = 2
        # of 4 and 4: F = 1/2, where a unigram overlap would give 1
        ("the gunman police killed", "police killed the gunman", 1 / 2),
        # 5 and 3 tokens, LCS "a c" = 2: P = 2/5, R = 2/3, F = 2*(2/5)*(2/3) / (16/15) = 1/2
        ("a b c d e", "a x c", 1 / 2),
        # nothing in common
        ("blue sky", "green grass", 0.0),
        # case and punctuation are separators only: tokens "the", "cat" on both sides
        ("The CAT!", "the cat", 1.0),
        # "42." tokenises to "42": equal
        ("42.", " 42", 1.0),
        # one number of two: LCS 1, P = 1/1, R = 1/2, F = 2/3
        ("12", "12 apples", 2 / 3),
        # empty prediction: no tokens, F = 0
        ("", "the cat", 0.0),
        ("   ", "the cat", 0.0),
    ],
)
def test_rouge_l_hand_worked(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=ULP)


@pytest.mark.parametrize(
    "prediction,reference,expected",
    [
        ("42", "42", 1.0),
        ("42.", " 42", 1.0),  # a final period and surrounding whitespace
        ("  42  ", "42", 1.0),
        ("'42'", "42", 1.0),  # surrounding quotes
        ('"42."', "42", 1.0),
        ("`42`", "42", 1.0),
        ("Paris", "paris", 1.0),  # case
        ("PARIS!", "Paris", 1.0),
        ("Really?", "really", 1.0),
        ("New   York\n", "new york", 1.0),  # inner runs of whitespace collapse
        ("42", "43", 0.0),
        ("4 2", "42", 0.0),  # inner whitespace is kept (collapsed, not removed)
        ("42.0", "42", 0.0),  # only a *final* . ! ? goes: "42.0" is another answer
        ("-5", "5", 0.0),  # a sign is part of the answer
        ("The answer is 42", "42", 0.0),  # exact, not contained
        ("", "42", 0.0),  # empty prediction
    ],
)
def test_exact_match_normalisation(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


def test_normalize_answer_examples():
    assert normalize_answer('  "42." ') == "42"  # the docstring's example
    assert normalize_answer("Hello,\tWorld!") == "hello, world"
    assert normalize_answer("") == ""


def test_quotes_inside_a_final_period_normalise_alike():
    """``"Paris".`` (the quoted answer and then the sentence's period) is the answer Paris, as
    ``"Paris."`` is: the quotes and the final period are removed whatever their order."""
    assert exact_match('"Paris".', "Paris") == 1.0
    assert exact_match("'42'!", "42") == 1.0
    assert exact_match('"42" .', "42") == 1.0


def test_score_answers_means_over_pairs():
    preds = ["the cat sat on the mat", "42.", "", "Paris"]
    refs = ["the cat lay on the mat", " 42", "7", "paris"]
    scores = score_answers(preds, refs)
    # ROUGE-L: 5/6, 1, 0, 1 (see above); exact match: 0, 1, 0, 1
    assert scores["rouge_l"] == pytest.approx((5 / 6 + 1 + 0 + 1) / 4, abs=ULP)
    assert scores["exact_match"] == pytest.approx(2 / 4, abs=ULP)
    assert set(scores) == {"rouge_l", "exact_match"}


def test_score_answers_empty_is_nan():
    scores = score_answers([], [])
    assert math.isnan(scores["rouge_l"]) and math.isnan(scores["exact_match"])


@pytest.mark.parametrize("n_pred,n_ref", [(2, 1), (0, 1), (1, 3)])
def test_score_answers_mismatched_lengths(n_pred, n_ref):
    with pytest.raises(ValueError, match=rf"pair up, got {n_pred} and {n_ref}"):
        score_answers(["x"] * n_pred, ["x"] * n_ref)
