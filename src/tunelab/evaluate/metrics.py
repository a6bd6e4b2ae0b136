"""Evaluation metrics as pure functions.

Every function takes plain Python sequences (lists, tuples or numpy arrays; a caller holding torch
tensors passes ``tensor.tolist()``) and returns plain floats, ints, lists and dicts, so that results can
be written to JSON as they are. This module never imports torch.

Where a reference implementation is the one people report numbers with, we call it (seqeval for
entity spans, sacrebleu for BLEU / chrF, rouge-score for ROUGE) and import it only when the metric is
used. Classification metrics and the SQuAD scores are small enough to compute here; their definitions
are cited next to the code and tested against scikit-learn and worked examples.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def _as_int_list(values: Sequence[Any], name: str) -> list[int]:
    """`values` as a list of Python ints (accepts numpy arrays and integral floats)."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not float(v).is_integer():
            raise ValueError(f"{name}[{i}] = {v!r} is not a class id (an integer)")
        iv = int(v)
        if iv < 0:
            raise ValueError(
                f"{name}[{i}] = {iv} is negative; drop ignored positions (e.g. -100) before computing metrics"
            )
        out.append(iv)
    return out


def _checked_pair(predictions: Sequence[Any], references: Sequence[Any]) -> tuple[list[int], list[int]]:
    preds = _as_int_list(predictions, "predictions")
    refs = _as_int_list(references, "references")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references: they must pair up one to one")
    if not refs:
        raise ValueError("no examples: predictions and references are empty")
    return preds, refs


def confusion_matrix(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> list[list[int]]:
    """Counts C[i][j] of examples whose reference is class i and prediction is class j.

    Rows are references, columns predictions (scikit-learn's convention), so the diagonal holds the
    correct predictions, a row sums to the support of its class and a column to how often it was predicted.
    """
    preds, refs = _checked_pair(predictions, references)
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}")
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for i, (p, r) in enumerate(zip(preds, refs)):
        if p >= num_labels or r >= num_labels:
            which, value = ("prediction", p) if p >= num_labels else ("reference", r)
            raise ValueError(f"example {i}: {which} class {value} is outside 0..{num_labels - 1}")
        matrix[r][p] += 1
    return matrix


def _safe_div(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 0 when the denominator is 0 (scikit-learn's zero_division=0)."""
    return numerator / denominator if denominator else 0.0


def classification_metrics(
    predictions: Sequence[int], references: Sequence[int], labels: Sequence[str] | None = None
) -> dict:
    """Accuracy, macro precision / recall / F1, per-class scores and the confusion matrix.

    For class c with tp, fp, fn counted one-vs-rest:
        precision_c = tp / (tp + fp),  recall_c = tp / (tp + fn),  F1_c = 2 tp / (2 tp + fp + fn),
    each 0 when its denominator is 0 (scikit-learn's ``zero_division=0``). "precision", "recall" and "f1"
    are the unweighted means of the per-class values (macro average):

    * with `labels` (names of classes 0..len(labels)-1), the mean is over **all** those classes, even one
      that occurs in neither references nor predictions (it then scores 0) -- the same number as
      ``sklearn.metrics.f1_score(references, predictions, average="macro", labels=range(len(labels)),
      zero_division=0)``;
    * without `labels`, over the classes present in references ∪ predictions (scikit-learn's default),
      named by their id as a string ("0", "1", ...).

    "per_class" maps each class name to {"precision", "recall", "f1", "support"} (support: references of
    that class). "confusion_matrix" has rows = reference, columns = prediction; it is len(labels) square,
    or (largest id + 1) square without labels, so that row / column i is always class id i.
    """
    preds, refs = _checked_pair(predictions, references)
    if labels is not None:
        labels = [str(name) for name in labels]
        num_labels = len(labels)
        if num_labels == 0:
            raise ValueError("labels is empty")
        classes = list(range(num_labels))
        names = labels
    else:
        classes = sorted(set(refs) | set(preds))
        num_labels = classes[-1] + 1
        names = [str(c) for c in classes]
    matrix = confusion_matrix(preds, refs, num_labels)

    per_class: dict[str, dict[str, float | int]] = {}
    for c, name in zip(classes, names):
        tp = matrix[c][c]
        support = sum(matrix[c])  # references of class c = tp + fn
        predicted = sum(row[c] for row in matrix)  # predictions of class c = tp + fp
        fp, fn = predicted - tp, support - tp
        per_class[name] = {
            "precision": _safe_div(tp, tp + fp),
            "recall": _safe_div(tp, tp + fn),
            "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
            "support": support,
        }

    def macro(key: str) -> float:
        return sum(float(scores[key]) for scores in per_class.values()) / len(per_class)

    correct = sum(matrix[c][c] for c in range(num_labels))
    return {
        "accuracy": correct / len(refs),
        "precision": macro("precision"),
        "recall": macro("recall"),
        "f1": macro("f1"),
        "per_class": per_class,
        "confusion_matrix": matrix,
    }


# ---------------------------------------------------------------------------------------------
# Entity spans (NER, chunking) with seqeval
# ---------------------------------------------------------------------------------------------

SPAN_SCHEMES = ("IOB1", "IOB2", "IOE1", "IOE2", "IOBES", "BILOU")


def _check_tag_sequences(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predicted sentences but {len(references)} reference sentences")
    for i, (p, r) in enumerate(zip(predictions, references)):
        if isinstance(p, str) or isinstance(r, str):
            raise ValueError(f"sentence {i}: expected a list of tags, got a string")
        if len(p) != len(r):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags but {len(r)} reference tags")


def _sentence_entities(tags: list[str], index: int, scheme: str | None) -> set[tuple[str, int, int]]:
    """The (type, start, end) chunks of one tag sequence, found by seqeval's own chunking rules."""
    try:
        if scheme is None:
            from seqeval.metrics.sequence_labeling import get_entities

            return {(type_, start, end) for type_, start, end in get_entities(tags)}
        from seqeval import scheme as seqeval_schemes
        from seqeval.scheme import Tokens

        tokens = Tokens(tags, scheme=getattr(seqeval_schemes, scheme))
        return {(e.tag, e.start, e.end) for e in tokens.entities}
    except (KeyError, IndexError, ValueError) as err:
        shown = tags if len(tags) <= 20 else [*tags[:20], "..."]
        raise ValueError(
            f"sentence {index}: {shown} are not valid {scheme or 'IOB'} tags ({err!s}); expected tags such as "
            "B-PER, I-PER, O"
        ) from None


def span_metrics(
    predictions: list[list[str]], references: list[list[str]], scheme: str | None = "IOB2"
) -> dict:
    """Entity-level micro precision / recall / F1 (CoNLL-2003 style), with seqeval's chunking.

    An entity counts as correct only when its type, first and last token all match a reference entity:
    a partly matched span or a span with the wrong type is both a false positive and a false negative.
    P = correct / predicted entities, R = correct / reference entities, F1 = 2PR / (P + R), 0 when a
    denominator is 0; per type likewise. The numbers equal seqeval's precision_score / recall_score /
    f1_score and classification_report with the same mode:

    * `scheme` one of IOB1, IOB2, IOE1, IOE2, IOBES, BILOU: seqeval's ``mode="strict"`` with that scheme,
      in which only well-formed chunks are entities (in IOB2, a chunk starts at B-; an I- tag after O or
      after another type starts nothing). A tag whose prefix the scheme does not allow is a ValueError.
    * `scheme=None`: seqeval's default mode, compatible with the conlleval.pl script, which also starts
      an entity at an I- tag that follows O or another type.

    Returns {"precision", "recall", "f1"} (micro over all entities), "accuracy" (token-level: share of
    tags, O included, that equal the reference) and "per_type": {type: {"precision", "recall", "f1",
    "support"}} (support: reference entities of that type), types sorted by name.
    """
    _check_tag_sequences(predictions, references)
    if scheme is not None:
        if scheme.upper() not in SPAN_SCHEMES:
            raise ValueError(f"unknown tagging scheme {scheme!r}; expected one of {', '.join(SPAN_SCHEMES)} or None")
        scheme = scheme.upper()
    refs = [[str(tag) for tag in sent] for sent in references]
    preds = [[str(tag) for tag in sent] for sent in predictions]
    num_tags = sum(len(sent) for sent in refs)
    if num_tags == 0:
        raise ValueError("no tags: the reference sentences are all empty")

    true_entities: set[tuple[int, str, int, int]] = set()
    pred_entities: set[tuple[int, str, int, int]] = set()
    for i, (ref, pred) in enumerate(zip(refs, preds)):
        true_entities |= {(i, *chunk) for chunk in _sentence_entities(ref, i, scheme)}
        pred_entities |= {(i, *chunk) for chunk in _sentence_entities(pred, i, scheme)}

    def scores(true: set, pred: set) -> dict[str, float | int]:
        correct = len(true & pred)
        return {
            "precision": _safe_div(correct, len(pred)),
            "recall": _safe_div(correct, len(true)),
            "f1": _safe_div(2 * correct, len(pred) + len(true)),
            "support": len(true),
        }

    types = sorted({e[1] for e in true_entities} | {e[1] for e in pred_entities})
    per_type = {
        t: scores({e for e in true_entities if e[1] == t}, {e for e in pred_entities if e[1] == t}) for t in types
    }
    micro = scores(true_entities, pred_entities)
    correct_tags = sum(r == p for ref, pred in zip(refs, preds) for r, p in zip(ref, pred))
    return {
        "precision": micro["precision"],
        "recall": micro["recall"],
        "f1": micro["f1"],
        "accuracy": correct_tags / num_tags,
        "per_type": per_type,
    }


# ---------------------------------------------------------------------------------------------
# Extractive QA: SQuAD v1.1 exact match and token F1
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's answer normalisation, in the official script's order: lower-case, delete ASCII
    punctuation, replace the articles a / an / the (whole words) by a space, collapse whitespace."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _no_answer_score(prediction: str) -> float:
    """SQuAD 2.0's rule for an unanswerable question: 1 when the prediction normalises to empty."""
    return float(squad_normalize(prediction) == "")


def squad_exact_match(prediction: str, ground_truths: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised ground truth, else 0.0.

    An empty `ground_truths` list marks an unanswerable question (SQuAD 2.0): only an empty answer
    scores 1.
    """
    if isinstance(ground_truths, str):
        ground_truths = [ground_truths]
    if not ground_truths:
        return _no_answer_score(prediction)
    normalized = squad_normalize(prediction)
    return float(any(normalized == squad_normalize(truth) for truth in ground_truths))


def _token_f1(prediction: str, truth: str) -> float:
    """SQuAD v1.1 token F1: common = multiset intersection of the normalised whitespace tokens,
    P = |common| / |prediction tokens|, R = |common| / |truth tokens|, F1 = 2PR / (P + R); 0 without overlap."""
    pred_tokens = squad_normalize(prediction).split()
    truth_tokens = squad_normalize(truth).split()
    num_same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, ground_truths: Sequence[str]) -> float:
    """Token-overlap F1 against the best-matching ground truth (max over ground truths, as in SQuAD v1.1).

    An empty `ground_truths` list marks an unanswerable question (SQuAD 2.0): only an empty answer
    scores 1.
    """
    if isinstance(ground_truths, str):
        ground_truths = [ground_truths]
    if not ground_truths:
        return _no_answer_score(prediction)
    return max(_token_f1(prediction, truth) for truth in ground_truths)


def qa_metrics(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict:
    """Mean SQuAD exact match and F1 over the questions in `references`, on a 0-1 scale.

    As in the official script, a question without a prediction scores 0, and predictions for ids that
    are not in `references` are ignored. (The official script prints 0-100; we report 0-1.)
    """
    if not references:
        raise ValueError("no reference questions")
    exact = f1 = 0.0
    for qid, truths in references.items():
        if qid not in predictions:
            continue
        exact += squad_exact_match(predictions[qid], truths)
        f1 += squad_f1(predictions[qid], truths)
    return {"exact_match": exact / len(references), "f1": f1 / len(references)}


# ---------------------------------------------------------------------------------------------
# Language modelling
# ---------------------------------------------------------------------------------------------

_MAX_EXP_ARGUMENT = 700.0  # exp(709.8) is the largest finite double


def perplexity(mean_loss_nats: float) -> float:
    """exp(mean cross-entropy in nats per token); inf when the loss is above 700 (exp would overflow)."""
    loss = float(mean_loss_nats)
    if math.isnan(loss):
        return math.nan
    if loss > _MAX_EXP_ARGUMENT:
        return math.inf
    return math.exp(loss)


# ---------------------------------------------------------------------------------------------
# Generation: BLEU, chrF (sacrebleu) and ROUGE (rouge-score)
# ---------------------------------------------------------------------------------------------


def _reference_streams(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]):
    """references -> sacrebleu's layout (a list of reference streams, each aligned with the hypotheses).

    `references` is either one reference string per hypothesis, or one list of references per hypothesis
    (references[i] belongs to hypotheses[i]; the lists may differ in length).
    """
    hypotheses = [str(h) for h in hypotheses]
    if len(references) != len(hypotheses):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: give one reference string, "
            "or one list of references, per hypothesis"
        )
    if not hypotheses:
        raise ValueError("no hypotheses")
    if all(isinstance(r, str) for r in references):
        return hypotheses, [list(references)]
    per_hypothesis = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else [str(r) for r in refs]
        if not refs:
            raise ValueError(f"hypothesis {i} has no reference")
        per_hypothesis.append(refs)
    width = max(len(refs) for refs in per_hypothesis)
    # sacrebleu skips None entries, which allows a varying number of references per segment.
    streams = [[refs[k] if k < len(refs) else None for refs in per_hypothesis] for k in range(width)]
    return hypotheses, streams


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (Papineni et al., 2002) as computed by sacrebleu's defaults (13a tokenisation,
    exponential smoothing), 0-100. `references`: one string or one list of strings per hypothesis."""
    from sacrebleu.metrics import BLEU

    hyps, streams = _reference_streams(hypotheses, references)
    return float(BLEU().corpus_score(hyps, streams).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus chrF (Popović, 2015) with sacrebleu's defaults (character 6-grams, beta = 2), 0-100.
    `references`: one string or one list of strings per hypothesis."""
    from sacrebleu.metrics import CHRF

    hyps, streams = _reference_streams(hypotheses, references)
    return float(CHRF().corpus_score(hyps, streams).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> dict:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (Lin, 2004), 0-1, from Google's rouge-score with
    the Porter stemmer. With several references per prediction, each type takes the best reference
    (rouge-score's ``score_multi``). rouge-score keeps only ASCII letters and digits when tokenising."""
    from rouge_score.rouge_scorer import RougeScorer

    predictions = [str(p) for p in predictions]
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions")
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        if isinstance(refs, str):
            scores = scorer.score(refs, prediction)
        else:
            refs = [str(r) for r in refs]
            if not refs:
                raise ValueError(f"prediction {i} has no reference")
            scores = scorer.score_multi(refs, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: totals[key] / len(predictions) for key in ROUGE_TYPES}


# One output against its reference: what judges an output alone (the feedback store's gold judge).
SENTENCE_METRICS = ("bleu", "chrf", "rouge")


def sentence_score(metric: str, prediction: str, reference: str | Sequence[str]) -> float:
    """One prediction's score against its reference(s): sacrebleu's sentence BLEU (with effective order, so
    that a short sentence without 4-gram matches is not scored 0 outright) or chrF, 0-100; or rouge-score's
    ROUGE-L F-measure with the Porter stemmer, 0-1."""
    references = [reference] if isinstance(reference, str) else [str(r) for r in reference]
    if not references:
        raise ValueError("no reference")
    if metric == "bleu":
        from sacrebleu.metrics import BLEU

        return float(BLEU(effective_order=True).sentence_score(str(prediction), references).score)
    if metric == "chrf":
        from sacrebleu.metrics import CHRF

        return float(CHRF().sentence_score(str(prediction), references).score)
    if metric == "rouge":
        from rouge_score.rouge_scorer import RougeScorer

        scorer = RougeScorer(["rougeL"], use_stemmer=True)
        return float(scorer.score_multi(references, str(prediction))["rougeL"].fmeasure)
    raise ValueError(f"unknown sentence metric {metric!r} (known: {', '.join(SENTENCE_METRICS)})")


def tag_entities(tags: Sequence[str], scheme: str | None = None) -> list[tuple[str, int, int]]:
    """The (type, first word, last word) entities of one tag sequence by seqeval's chunking (scheme None: the
    conlleval rules of span_metrics' default), sorted by position."""
    return sorted(_sentence_entities([str(t) for t in tags], 0, scheme), key=lambda e: (e[1], e[2], e[0]))


# ---------------------------------------------------------------------------------------------
# Preference learning
# ---------------------------------------------------------------------------------------------


def preference_metrics(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]) -> dict:
    """Reward accuracy (share of pairs with chosen reward strictly above rejected; a tie counts as wrong)
    and mean margin, mean(chosen - rejected), for reward models and DPO's implicit rewards."""
    if hasattr(chosen_rewards, "tolist"):
        chosen_rewards = chosen_rewards.tolist()
    if hasattr(rejected_rewards, "tolist"):
        rejected_rewards = rejected_rewards.tolist()
    chosen = [float(x) for x in chosen_rewards]
    rejected = [float(x) for x in rejected_rewards]
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen rewards but {len(rejected)} rejected rewards")
    if not chosen:
        raise ValueError("no preference pairs")
    wins = sum(c > r for c, r in zip(chosen, rejected))
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)
    return {"reward_accuracy": wins / len(chosen), "margin": margin}
