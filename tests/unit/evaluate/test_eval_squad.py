"""SQuAD v1.1 normalisation, exact match and token F1 on worked examples."""

from __future__ import annotations

import pytest

from tunelab.evaluate.metrics import qa_metrics, squad_exact_match, squad_f1, squad_normalize


@pytest.mark.parametrize(("text", "normalized"), [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("an apple a day", "apple day"),
    ("Theatre and anthem", "theatre and anthem"),  # articles only as whole words
    ("  U.S.A.  ", "usa"),
    ("rock-'n'-roll", "rocknroll"),
    ("", ""),
])
def test_normalize(text, normalized):
    assert squad_normalize(text) == normalized


def test_exact_match():
    assert squad_exact_match("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert squad_exact_match("Paris", ["London", "paris!"]) == 1.0  # any ground truth
    assert squad_exact_match("Paris, France", ["Paris"]) == 0.0


def test_f1_no_overlap_is_zero():
    assert squad_f1("blue", ["red"]) == 0.0
    assert squad_f1("the", ["a"]) == 0.0  # both normalise to nothing: no common token


def test_f1_partial_overlap():
    # prediction tokens [big, red, dog, barked], truth [red, dog]: common 2, P = 2/4, R = 2/2
    p, r = 0.5, 1.0
    assert squad_f1("the big red dog barked", ["a red dog"]) == pytest.approx(2 * p * r / (p + r))


def test_f1_max_over_ground_truths():
    # vs "dog": P 1/2, R 1 -> 2/3; vs "big red dog": P 1, R 2/3 -> 0.8
    assert squad_f1("red dog", ["dog", "big red dog"]) == pytest.approx(0.8)


def test_f1_counts_repeated_tokens_once_per_match():
    # multiset intersection: "dog dog" and "dog" share one token -> P 1/2, R 1
    assert squad_f1("dog dog", ["dog"]) == pytest.approx(2 / 3)


def test_unanswerable_question():
    assert squad_exact_match("", []) == 1.0 and squad_f1("", []) == 1.0
    assert squad_exact_match("Paris", []) == 0.0 and squad_f1("Paris", []) == 0.0


def test_qa_metrics_mean_over_references():
    predictions = {"q1": "Eiffel Tower", "q2": "red dog", "extra": "ignored"}
    references = {"q1": ["the Eiffel Tower"], "q2": ["big red dog"], "q3": ["missing prediction"]}
    m = qa_metrics(predictions, references)
    assert m == pytest.approx({"exact_match": 1 / 3, "f1": (1.0 + 0.8 + 0.0) / 3})
    with pytest.raises(ValueError):
        qa_metrics({}, {})
