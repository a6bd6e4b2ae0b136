"""FeedbackRecord: what a valid record is, and errors that name the field."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tunelab.feedback import FeedbackRecord, FeedbackRecordError
from tunelab.feedback.record import parse_time

GOOD = {"input": "What is 2 + 3?", "output": "5", "model": "smollm2", "verdict": "good", "source": "rule"}


def problems(**fields) -> list[str]:
    with pytest.raises(FeedbackRecordError) as err:
        FeedbackRecord.from_dict({**GOOD, **fields}, "f.jsonl:4")
    assert str(err.value).startswith("f.jsonl:4: ")
    return err.value.problems


def test_a_valid_record_is_normalised():
    record = FeedbackRecord.from_dict({**GOOD, "verdict": "Good", "source": "reward-model", "score": 1,
                                       "model_version": 3, "created_at": "2025-01-31T10:00:00+01:00"})
    assert (record.verdict, record.source, record.score, record.model_version) == ("good", "reward_model", 1.0, "3")
    assert isinstance(record.score, float)
    assert record.created_at == "2025-01-31T09:00:00.000000Z"  # in UTC
    assert record.metadata == {} and record.id is None


def test_chat_messages_as_input():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    record = FeedbackRecord.from_dict({**GOOD, "input": messages})
    assert record.input == messages
    assert record.input_text == "system: Be brief.\nuser: Hi"
    assert problems(input=[{"role": "user"}]) == ["field 'input': message 0: 'content' must be a string, found null"]
    assert problems(input=[]) == ["field 'input': empty list of messages"]
    assert problems(input=["hi"]) == [
        "field 'input': message 0: expected an object with 'role' and 'content', found a string \"hi\""]


def test_missing_and_null_required_fields():
    data = dict(GOOD)
    del data["output"]
    with pytest.raises(FeedbackRecordError) as err:
        FeedbackRecord.from_dict(data, "x.json:2")
    assert err.value.problems == ["missing field 'output'"]
    assert problems(model=None) == ["field 'model' is null"]


def test_bad_values_name_their_field():
    assert problems(verdict="great") == ["field 'verdict': expected 'good', 'bad' or null, found a string \"great\""]
    assert problems(score="high") == ["field 'score': expected a number or null, found a string \"high\""]
    assert problems(score=True) == ["field 'score': expected a number or null, found a boolean true"]
    assert problems(score=float("nan")) == ["field 'score': expected a finite number, found nan"]
    assert problems(source="human") == [
        "field 'source': expected one of person, rule, reward_model, gold, judge, found a string \"human\""]
    assert problems(metadata=[1]) == ["field 'metadata': expected an object, found a list"]
    assert problems(created_at="yesterday")[0].startswith("field 'created_at': expected an ISO 8601 date or time")
    assert problems(output=5) == ["field 'output': expected a string, found a number 5"]


def test_a_judgement_is_required_and_a_score_alone_is_one():
    assert problems(verdict=None) == [
        "needs a judgement: field 'verdict' ('good' or 'bad') or field 'score', or both"]
    assert FeedbackRecord.from_dict({**GOOD, "verdict": None, "score": -2.5}).score == -2.5


def test_unknown_fields_suggest_the_nearest():
    assert problems(scroe=1) == ["unknown field 'scroe'; did you mean 'score'?"]
    assert problems(zzz=1)[0].startswith("unknown field 'zzz' (known: id, input, output")


def test_several_problems_are_all_reported():
    assert problems(verdict="meh", source="me", output=None) == [
        "field 'output' is null",
        "field 'source': expected one of person, rule, reward_model, gold, judge, found a string \"me\"",
        "field 'verdict': expected 'good', 'bad' or null, found a string \"meh\"",
    ]


def test_direct_construction_validates_too():
    with pytest.raises(FeedbackRecordError, match="field 'verdict'"):
        FeedbackRecord(input="a", output="b", model="m", source="person", verdict="fine")


def test_to_dict_round_trips():
    record = FeedbackRecord.from_dict({**GOOD, "reference": ["B-PER", "O"], "metadata": {"k": [1]}, "task": "tagging"})
    assert FeedbackRecord.from_dict(record.to_dict()) == record


def test_parse_time():
    assert parse_time("2025-01-31") == "2025-01-31T00:00:00.000000Z"
    assert parse_time("2025-01-31T09:15:02Z") == "2025-01-31T09:15:02.000000Z"
    assert parse_time(datetime(2025, 1, 31, 9, tzinfo=timezone.utc)) == "2025-01-31T09:00:00.000000Z"
    now = datetime.now(timezone.utc)
    week_ago = datetime.fromisoformat(parse_time("7d", relative=True).replace("Z", "+00:00"))
    assert abs((now - week_ago).total_seconds() - 7 * 86400) < 60
    with pytest.raises(ValueError, match="or an age"):
        parse_time("last week", relative=True)
