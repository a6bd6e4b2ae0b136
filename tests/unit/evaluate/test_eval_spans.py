"""span_metrics: hand-worked BIO examples and agreement with seqeval's own scoring functions."""

from __future__ import annotations

import random
import warnings

import pytest
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
from seqeval.scheme import IOB2, IOBES

from tunelab.evaluate.metrics import span_metrics

REFS = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "I-ORG", "O"]]
PREDS = [["B-PER", "I-PER", "O", "B-ORG", "O"], ["B-ORG", "I-ORG", "O", "O"]]


def test_hand_example():
    # reference entities: PER(0:0-1), LOC(0:3), ORG(1:0-2)
    # predicted: PER(0:0-1) exact; ORG(0:3) wrong type; ORG(1:0-1) only partly matches -> 1 correct of 3 / 3
    m = span_metrics(PREDS, REFS)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(7 / 9)  # one wrong tag in each sentence, 9 tags
    assert m["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert m["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert list(m["per_type"]) == ["LOC", "ORG", "PER"]


def test_hand_example_equals_seqeval():
    m = span_metrics(PREDS, REFS, scheme=None)
    assert m["f1"] == pytest.approx(f1_score(REFS, PREDS))
    assert m["precision"] == pytest.approx(precision_score(REFS, PREDS))
    assert m["recall"] == pytest.approx(recall_score(REFS, PREDS))
    assert m["accuracy"] == pytest.approx(accuracy_score(REFS, PREDS))


def test_precision_differs_from_recall():
    refs = [["B-PER", "O", "B-LOC", "I-LOC"]]
    preds = [["B-PER", "O", "O", "O"]]
    m = span_metrics(preds, refs)
    assert (m["precision"], m["recall"]) == (1.0, 0.5)
    assert m["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_strict_iob2_versus_conlleval_mode():
    # an entity opened by I- counts in conlleval's lenient mode, not in strict IOB2
    refs = [["B-PER", "I-PER", "O"]]
    preds = [["I-PER", "I-PER", "O"]]
    assert span_metrics(preds, refs, scheme=None)["f1"] == 1.0
    strict = span_metrics(preds, refs, scheme="IOB2")
    assert strict["f1"] == 0.0
    assert strict["f1"] == f1_score(refs, preds, mode="strict", scheme=IOB2)


def _tag_set(prefixes: str) -> list[str]:
    return ["O"] * 4 + [f"{p}-{t}" for p in prefixes for t in ("PER", "LOC", "MISC")]


@pytest.mark.parametrize("scheme", [None, "IOB2", "IOBES"])
def test_random_sequences_equal_seqeval(scheme):
    rng = random.Random(0)
    prefixes = "BIES" if scheme == "IOBES" else "BI"
    tags = _tag_set(prefixes)
    refs = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(60)]
    preds = [[tag if rng.random() < 0.7 else rng.choice(tags) for tag in sent] for sent in refs]
    m = span_metrics(preds, refs, scheme=scheme)
    kw = {} if scheme is None else {"mode": "strict", "scheme": {"IOB2": IOB2, "IOBES": IOBES}[scheme]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["precision"] == pytest.approx(precision_score(refs, preds, **kw))
        assert m["recall"] == pytest.approx(recall_score(refs, preds, **kw))
        assert m["f1"] == pytest.approx(f1_score(refs, preds, **kw))
        report = classification_report(refs, preds, output_dict=True, zero_division=0, **kw)
    assert m["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    types = {k for k in report if not k.endswith(" avg")}
    assert set(m["per_type"]) == types
    for t in types:
        assert m["per_type"][t] == pytest.approx({
            "precision": report[t]["precision"], "recall": report[t]["recall"],
            "f1": report[t]["f1-score"], "support": report[t]["support"],
        })


def test_no_entities_anywhere():
    m = span_metrics([["O", "O"]], [["O", "O"]])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["per_type"]) == (0.0, 0.0, 0.0, 1.0, {})


def test_length_mismatch_names_the_sentence():
    with pytest.raises(ValueError, match="sentence 1: 2 predicted tags but 3 reference tags"):
        span_metrics([["O"], ["O", "O"]], [["O"], ["O", "O", "O"]])
    with pytest.raises(ValueError, match="2 predicted sentences but 1 reference"):
        span_metrics([["O"], ["O"]], [["O"]])


def test_invalid_tags_and_scheme():
    with pytest.raises(ValueError, match="sentence 0: .*not valid IOB2"):
        span_metrics([["S-PER", "O"]], [["B-PER", "O"]])
    with pytest.raises(ValueError, match="unknown tagging scheme"):
        span_metrics([["O"]], [["O"]], scheme="XYZ")
