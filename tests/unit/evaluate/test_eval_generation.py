"""BLEU / chrF / ROUGE equal the reference libraries; perplexity and preference metrics by hand."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tunelab.evaluate.metrics import bleu, chrf, perplexity, preference_metrics, rouge

HYPS = [
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "we evaluated the models on the test set",
    "it rains",
]
REFS = [
    "the cat is sitting on the mat",
    "the quick brown fox jumped over the lazy dog",
    "the models were evaluated on the held-out test set",
    "it is raining today",
]
REFS2 = [
    "a cat sat on the mat",
    "a fast brown fox leaps over a lazy dog",
    "we tested the models on the test data",
    "rain is falling",
]


def test_bleu_and_chrf_equal_sacrebleu():
    assert bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert 0.0 < bleu(HYPS, REFS) < 100.0


def test_multiple_references_per_hypothesis():
    per_hypothesis = [[a, b] for a, b in zip(REFS, REFS2)]
    assert bleu(HYPS, per_hypothesis) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS, REFS2]).score)
    assert chrf(HYPS, per_hypothesis) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS, REFS2]).score)
    # a varying number of references: sacrebleu skips the missing (None) ones
    ragged = [[REFS[0], REFS2[0]], [REFS[1]], [REFS[2]], [REFS[3], REFS2[3]]]
    streams = [REFS, [REFS2[0], None, None, REFS2[3]]]
    assert bleu(HYPS, ragged) == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score)


def test_identical_text_scores_100():
    assert bleu(REFS, REFS) == pytest.approx(100.0)
    assert chrf(REFS, REFS) == pytest.approx(100.0)


def test_reference_count_mismatch():
    with pytest.raises(ValueError, match="4 hypotheses but 3 references"):
        bleu(HYPS, REFS[:3])


def test_rouge_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(HYPS, REFS)]
    expected = {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}
    assert rouge(HYPS, REFS) == pytest.approx(expected)
    multi = [scorer.score_multi([a, b], hyp) for hyp, a, b in zip(HYPS, REFS, REFS2)]
    expected_multi = {k: sum(s[k].fmeasure for s in multi) / len(multi) for k in expected}
    assert rouge(HYPS, [[a, b] for a, b in zip(REFS, REFS2)]) == pytest.approx(expected_multi)


def test_perplexity():
    assert perplexity(math.log(10)) == pytest.approx(10.0)
    assert perplexity(0.0) == 1.0
    assert perplexity(800.0) == math.inf
    assert math.isnan(perplexity(float("nan")))


def test_preference_metrics_by_hand():
    chosen = [1.0, 0.5, -1.0, 2.0]
    rejected = [0.0, 0.5, 0.0, 1.0]
    # wins: 1 > 0, 0.5 = 0.5 (tie: not a win), -1 < 0, 2 > 1 -> 2 of 4; margins 1, 0, -1, 1 -> 0.25
    assert preference_metrics(chosen, rejected) == pytest.approx({"reward_accuracy": 0.5, "margin": 0.25})
    with pytest.raises(ValueError):
        preference_metrics([1.0], [])
