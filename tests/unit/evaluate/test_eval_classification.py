"""classification_metrics and confusion_matrix against scikit-learn and hand counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, precision_score, recall_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from tunelab.evaluate.metrics import classification_metrics, confusion_matrix


def test_confusion_matrix_by_hand():
    preds = [0, 1, 1, 2, 0]
    refs = [0, 1, 2, 2, 1]
    # row = reference, column = prediction
    assert confusion_matrix(preds, refs, 3) == [
        [1, 0, 0],  # ref 0: predicted 0 once
        [1, 1, 0],  # ref 1: predicted 1 (example 1) and 0 (example 4)
        [0, 1, 1],  # ref 2: predicted 1 (example 2) and 2 (example 3)
    ]


def test_hand_example_scores():
    # 3 classes; class 2 is never predicted.
    preds = [0, 0, 1, 1, 0]
    refs = [0, 1, 1, 2, 0]
    m = classification_metrics(preds, refs, labels=["neg", "neu", "pos"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    # neg: tp 2, fp 1, fn 0 -> P 2/3, R 1, F1 4/5; neu: tp 1, fp 1, fn 1 -> 1/2 each; pos: all 0
    assert m["per_class"]["neg"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["neu"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["pos"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["f1"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [0, 1, 0]]
    json.dumps(m)  # plain Python types only


@pytest.mark.parametrize("num_classes", [2, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_with_labels(num_classes, seed):
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, num_classes, size=200)
    # the last class is never predicted: its precision is 0/0 -> 0 (zero_division=0)
    preds = rng.integers(0, num_classes - 1, size=200)
    preds = np.where((rng.random(200) < 0.5) & (refs < num_classes - 1), refs, preds)  # about half right
    labels = [f"c{i}" for i in range(num_classes)]
    m = classification_metrics(preds, refs.tolist(), labels=labels)
    kw = dict(labels=list(range(num_classes)), zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert m["precision"] == pytest.approx(precision_score(refs, preds, average="macro", **kw))
    assert m["recall"] == pytest.approx(recall_score(refs, preds, average="macro", **kw))
    assert m["f1"] == pytest.approx(f1_score(refs, preds, average="macro", **kw))
    p, r, f, s = precision_recall_fscore_support(refs, preds, average=None, **kw)
    for i, name in enumerate(labels):
        assert m["per_class"][name] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": int(s[i])}
        )
    assert m["per_class"][labels[-1]]["precision"] == 0.0
    assert m["confusion_matrix"] == sk_confusion_matrix(refs, preds, labels=list(range(num_classes))).tolist()
    json.dumps(m)


def test_labels_include_a_class_absent_from_the_data():
    rng = np.random.default_rng(7)
    refs = rng.integers(0, 4, size=100)
    preds = rng.integers(0, 4, size=100)
    m = classification_metrics(preds, refs, labels=list("abcdef"))  # classes 4 and 5 never occur
    assert m["f1"] == pytest.approx(f1_score(refs, preds, average="macro", labels=range(6), zero_division=0))
    assert m["per_class"]["f"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert len(m["confusion_matrix"]) == 6


def test_without_labels_averages_over_present_classes():
    rng = np.random.default_rng(3)
    refs = rng.choice([0, 2, 5], size=150)
    preds = rng.choice([0, 2, 3], size=150)
    m = classification_metrics(preds, refs)
    assert set(m["per_class"]) == {"0", "2", "3", "5"}
    assert m["f1"] == pytest.approx(f1_score(refs, preds, average="macro", zero_division=0))
    assert m["precision"] == pytest.approx(precision_score(refs, preds, average="macro", zero_division=0))
    assert m["recall"] == pytest.approx(recall_score(refs, preds, average="macro", zero_division=0))
    assert len(m["confusion_matrix"]) == 6  # row i is class id i


def test_bad_inputs():
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        classification_metrics([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="outside 0..1"):
        classification_metrics([0, 2], [0, 1], labels=["a", "b"])
    with pytest.raises(ValueError, match="negative"):
        classification_metrics([0, -100], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [])
