"""Extractive question answering (SQuAD v1.1): read, split by article, encode in windows, map answers back.

A context longer than the model's window is split into overlapping windows (Devlin et al. 2019, sec. 4.2):
each feature is [question, window of the context], consecutive windows share `stride` tokens, and a
training feature points at the answer's first and last token, or at (0, 0) (the [CLS] token) when its
window does not hold the whole answer. For evaluation each feature keeps the character span of every
context token, so the best-scoring span over all windows of a question maps back to the context text.
"""

from __future__ import annotations

import heapq
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.encoded import EncodedDataset
from tunelab.data.readers import PathLike, read_text_file
from tunelab.errors import DataError

if TYPE_CHECKING:
    import tokenizers

    from tunelab.tokenizer import Tokenizer


@dataclass
class QAExample:
    """One question about a context, with its gold answers ({"text", "answer_start"} character offsets)."""

    id: str
    question: str
    context: str
    answers: list[dict]
    title: str
    source: str


def read_squad(path: PathLike) -> list[QAExample]:
    """The questions of a SQuAD v1.1 JSON file ({"data": [{"title", "paragraphs": [{"context", "qas"}]}]}).

    Every answer must be found in its context at answer_start; otherwise DataError names the file, the line
    of the question's id, the question id and the field. Question ids must be unique. Unanswerable
    questions (SQuAD v2 "is_impossible", empty answers) are kept with answers [].
    """
    path = Path(path)
    text = read_text_file(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON at column {err.colno}: {err.msg}") from err
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DataError(f"{path}: expected SQuAD JSON, an object with a 'data' list of articles")
    lines = _LineFinder(text)
    examples: list[QAExample] = []
    seen: dict[str, str] = {}
    for a, article in enumerate(document["data"]):
        where = f"{path}: data[{a}]"
        article = _need(article, dict, where, "article")
        title = _need(article.get("title", ""), str, where, "field 'title'")
        for p, paragraph in enumerate(_need(article.get("paragraphs"), list, where, "field 'paragraphs'")):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            paragraph = _need(paragraph, dict, where, "paragraph")
            context = _need(paragraph.get("context"), str, where, "field 'context'")
            if not context.strip():
                raise DataError(f"{where}: field 'context': empty context")
            for q, qa in enumerate(_need(paragraph.get("qas"), list, where, "field 'qas'")):
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}]"
                qa = _need(qa, dict, where, "question")
                qid = qa.get("id")
                if isinstance(qid, int) and not isinstance(qid, bool):
                    qid = str(qid)
                qid = _need(qid, str, where, "field 'id'")
                source = f"{path}:{lines.line_of(json.dumps(qid, ensure_ascii=False))}"
                label = f"{source}: question '{qid}'"
                if qid in seen:
                    raise DataError(f"{label}: field 'id': duplicate question id (also at {seen[qid]})")
                seen[qid] = source
                question = _need(qa.get("question"), str, label, "field 'question'").strip()
                if not question:
                    raise DataError(f"{label}: field 'question': empty question")
                answers = _answers(qa, context, label)
                examples.append(QAExample(qid, question, context, answers, title, source))
    if not examples:
        raise DataError(f"{path}: no questions")
    return examples


class _LineFinder:
    """Line numbers of successive strings in a text (searched forward from the previous hit)."""

    def __init__(self, text: str) -> None:
        self._text, self._position, self._line = text, 0, 1

    def line_of(self, needle: str) -> int:
        found = self._text.find(needle, self._position)
        if found >= 0:
            self._line += self._text.count("\n", self._position, found)
            self._position = found
        return self._line


def _need(value: Any, kind: type, where: str, what: str) -> Any:
    if value is None:
        raise DataError(f"{where}: missing {what}")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: {what} must be {kind.__name__}, found {type(value).__name__}")
    return value


def _answers(qa: dict, context: str, label: str) -> list[dict]:
    raw = qa.get("answers", [])
    if not isinstance(raw, list):
        raise DataError(f"{label}: field 'answers' must be a list, found {type(raw).__name__}")
    if not raw and not qa.get("is_impossible", False):
        raise DataError(f"{label}: field 'answers': no answers (SQuAD v1.1 needs one; SQuAD v2 marks "
                        f"unanswerable questions with is_impossible)")
    answers = []
    for k, answer in enumerate(raw):
        name = f"answers[{k}]"
        answer = _need(answer, dict, label, f"field '{name}'")
        text = _need(answer.get("text"), str, label, f"field '{name}.text'")
        start = _need(answer.get("answer_start"), int, label, f"field '{name}.answer_start'")
        if not text:
            raise DataError(f"{label}: field '{name}.text': empty answer")
        found = context[start:start + len(text)] if 0 <= start else ""
        if found != text:
            elsewhere = context.find(text)
            hint = f"; the text occurs at {elsewhere}" if elsewhere >= 0 else "; the text is not in the context"
            raise DataError(f"{label}: field '{name}.answer_start': answer text {text!r} is not at answer_start "
                            f"{start} of the context (found {found!r}{hint})")
        answers.append({"text": text, "answer_start": start})
    return answers


def split_by_article(examples: Sequence[QAExample], fraction: float,
                     seed: int) -> tuple[list[QAExample], list[QAExample]]:
    """Hold out whole articles (by title) for validation, so no context is seen in both parts.

    round(fraction * articles) articles (at least one when fraction > 0 and there are two or more) are
    chosen by a shuffle seeded with `seed`; both parts keep the original order of the questions.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    titles = list(dict.fromkeys(example.title for example in examples))
    held_out = round(len(titles) * fraction)
    if fraction > 0 and held_out == 0 and len(titles) >= 2:
        held_out = 1
    random.Random(seed).shuffle(titles)
    validation_titles = set(titles[:held_out])
    return ([e for e in examples if e.title not in validation_titles],
            [e for e in examples if e.title in validation_titles])


# ---------------------------------------------------------------------------------------------- encoding


def _windows(examples: Sequence[QAExample], tokenizer: Tokenizer, max_length: int, stride: int,
             max_question_length: int | None) -> tuple[list[tuple[int, tokenizers.Encoding]], int]:
    """(example index, encoding of [question, context window]) for every window, and the number of questions
    cut to `max_question_length` (default: half of the room left by the special tokens)."""
    if stride < 0:
        raise ValueError(f"stride must be >= 0, got {stride}")
    backend = tokenizer.backend
    special = backend.num_special_tokens_to_add(True)
    question_limit = max_question_length if max_question_length is not None else (max_length - special) // 2
    questions = backend.encode_batch([e.question for e in examples], add_special_tokens=False)
    contexts = backend.encode_batch([e.context for e in examples], add_special_tokens=False)
    windows = []
    truncated = 0
    for index, (question, context) in enumerate(zip(questions, contexts)):
        if len(question.ids) > question_limit:
            question.truncate(question_limit)
            truncated += 1
        budget = max_length - special - len(question.ids)
        if budget <= stride:
            raise ValueError(f"max_length {max_length} leaves {budget} context tokens per window next to the "
                             f"question, which must be more than stride {stride}")
        if len(context.ids) > budget:
            context.truncate(budget, stride=stride)  # the rest goes to context.overflowing, `stride` overlapping
            pieces = [context, *context.overflowing]
        else:
            pieces = [context]
        windows.extend((index, backend.post_process(question, piece, add_special_tokens=True)) for piece in pieces)
    return windows, truncated


def _context_span(encoding: tokenizers.Encoding) -> tuple[int, int]:
    """First and last token index of the context (sequence 1) in a [question, context] encoding."""
    positions = [i for i, sequence in enumerate(encoding.sequence_ids) if sequence == 1]
    return positions[0], positions[-1]


def encode_qa_train(examples: Sequence[QAExample], tokenizer: Tokenizer, max_length: int = 384, stride: int = 128,
                    *, max_question_length: int | None = None) -> EncodedDataset:
    """Training features: "input_ids", "token_type_ids", "start_positions", "end_positions", "length".

    One feature per context window (consecutive windows overlap by `stride` tokens). The positions are the
    first and last token of the first gold answer, or (0, 0) when the window does not contain all of it.
    Questions longer than `max_question_length` tokens (default: half the room) are cut; `num_truncated`
    counts them.
    """
    windows, truncated = _windows(examples, tokenizer, max_length, stride, max_question_length)
    features = []
    for index, encoding in windows:
        example = examples[index]
        start, end = 0, 0
        if example.answers:
            answer = example.answers[0]
            start, end = _answer_tokens(encoding, answer["answer_start"], answer["answer_start"] + len(answer["text"]))
        features.append({"input_ids": list(encoding.ids), "token_type_ids": list(encoding.type_ids),
                         "start_positions": start, "end_positions": end, "length": len(encoding.ids),
                         "example_id": example.id})
    return EncodedDataset(features, num_examples=len(examples), num_truncated=truncated)


def _answer_tokens(encoding: tokenizers.Encoding, start_char: int, end_char: int) -> tuple[int, int]:
    """(first, last) token of the context characters [start_char, end_char), or (0, 0) if outside the window."""
    offsets = encoding.offsets
    first, last = _context_span(encoding)
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return 0, 0
    start = first
    while start < last and offsets[start][1] <= start_char:  # the token that holds start_char
        start += 1
    end = last
    while end > start and offsets[end][0] >= end_char:  # the token that holds end_char - 1
        end -= 1
    return start, end


def encode_qa_eval(examples: Sequence[QAExample], tokenizer: Tokenizer, max_length: int = 384, stride: int = 128,
                   *, max_question_length: int | None = None) -> EncodedDataset:
    """Evaluation features: "input_ids", "token_type_ids", "example_id", "offsets", "length".

    "offsets" holds the (start, end) character span in the context of every context token and None for the
    question and special tokens, so `postprocess_qa` only picks spans of the context.
    """
    windows, truncated = _windows(examples, tokenizer, max_length, stride, max_question_length)
    features = []
    for index, encoding in windows:
        offsets = [tuple(span) if sequence == 1 else None
                   for span, sequence in zip(encoding.offsets, encoding.sequence_ids)]
        features.append({"input_ids": list(encoding.ids), "token_type_ids": list(encoding.type_ids),
                         "example_id": examples[index].id, "offsets": offsets, "length": len(encoding.ids)})
    return EncodedDataset(features, num_examples=len(examples), num_truncated=truncated)


def _scores(row: Any, length: int) -> list[float]:
    """A feature's logits as floats, cut to its own length (rows of a right-padded batch are longer)."""
    values = row.tolist() if hasattr(row, "tolist") else list(row)
    if len(values) < length:
        raise ValueError(f"a logits row has {len(values)} values for a feature of {length} tokens")
    return [float(v) for v in values[:length]]


def postprocess_qa(examples: Sequence[QAExample], features: Sequence[dict], start_logits: Sequence[Any],
                   end_logits: Sequence[Any], *, n_best: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """question id -> predicted answer text: the best valid span over all windows of each question.

    Among the `n_best` highest start and end logits of each feature, a span is valid when both ends are
    context tokens, end >= start, and it has at most `max_answer_length` tokens; its score is
    start_logit + end_logit. The text is cut from the context through the token offsets ("" if no span is
    valid). Logit rows may be right-padded (a [features, tokens] tensor) or ragged lists.
    """
    if not len(features) == len(start_logits) == len(end_logits):
        raise ValueError(f"{len(features)} features but {len(start_logits)} start and {len(end_logits)} end rows")
    by_example: dict[str, list[int]] = defaultdict(list)
    for index, feature in enumerate(features):
        by_example[feature["example_id"]].append(index)

    predictions = {}
    for example in examples:
        best: tuple[float, int, int] | None = None
        for index in by_example.get(example.id, []):
            offsets = features[index]["offsets"]
            starts = _scores(start_logits[index], len(offsets))
            ends = _scores(end_logits[index], len(offsets))
            top_starts = heapq.nlargest(n_best, range(len(starts)), key=starts.__getitem__)
            top_ends = heapq.nlargest(n_best, range(len(ends)), key=ends.__getitem__)
            for s in top_starts:
                if offsets[s] is None:
                    continue
                for e in top_ends:
                    if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = starts[s] + ends[e]
                    if best is None or score > best[0]:
                        best = (score, offsets[s][0], offsets[e][1])
        predictions[example.id] = example.context[best[1]:best[2]] if best is not None else ""
    return predictions
