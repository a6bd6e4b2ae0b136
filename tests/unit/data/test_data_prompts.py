"""Prompt records for GRPO (data/prompts.py) and arithmetic problems from a seed (data/arithmetic.py)."""

from __future__ import annotations

import json
import random

import pytest

from tunelab.data.arithmetic import arithmetic_problems, evaluate, kind_size, make_problem, parse_kind
from tunelab.data.prompts import encode_prompts, load_prompts
from tunelab.errors import DataError
from tunelab.evaluate.verifiers import final_number


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_the_three_prompt_forms_keep_every_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 + 3?", "answer": 5},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "id": 7},
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}],
         "keys": ["colour"]},
        {"instruction": "Summarise.", "input": "A long text.", "output": "Short."},
    ])
    examples = load_prompts(path)
    assert [e.messages for e in examples] == [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Name a colour."}],  # the reference answer is not part of the prompt
        [{"role": "user", "content": "Summarise.\n\nA long text."}],
    ]
    assert [e.text for e in examples] == ["What is 2 + 3?", None, None, "Summarise.\n\nA long text."]
    assert examples[0].fields["answer"] == 5 and examples[2].fields["keys"] == ["colour"]
    assert examples[1].source == f"{path}:2"


@pytest.mark.parametrize("record,message", [
    ({"question": "x"}, r"p.jsonl:1: no prompt: expected a field 'prompt' .*found 'question'"),
    ({"prompt": "  "}, r"p.jsonl:1: field 'prompt' is empty"),
    ({"prompt": 3}, r"p.jsonl:1: field 'prompt': expected a string or a list of messages, found int"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     r"p.jsonl:1: field 'prompt': a prompt ends with a user message, not assistant"),
    ({"messages": [{"role": "robot", "content": "a"}]}, r"p.jsonl:1: field 'messages\[0\].role': unsupported role"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(DataError, match=message):
        load_prompts(path)


class FakeTokenizer:
    chat_template = None

    def encode(self, text):
        return [ord(c) for c in text]


def test_encoding_skips_too_long_prompts_with_the_reason(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abc"}, {"prompt": "abcdefgh"}, {"prompt": "xy"}])
    rows = encode_prompts(load_prompts(path), FakeTokenizer(), max_prompt_length=5)
    assert [f["prompt_ids"] for f in rows.features] == [[97, 98, 99], [120, 121]]
    assert [f["index"] for f in rows.features] == [0, 2]
    assert rows.num_skipped == 1 and "p.jsonl:2: the prompt has 8 tokens, more than" in rows.skipped_reasons[0]


def test_arithmetic_problems_are_reproducible_distinct_and_right():
    first = arithmetic_problems(300, seed=5)
    assert first == arithmetic_problems(300, seed=5) and first != arithmetic_problems(300, seed=6)
    assert len({r["problem"] for r in first}) == 300
    assert [r["kind"] for r in first[:6]] == ["2+1", "1*2", "2+2"] * 2
    for record in first:
        assert final_number(str(record["answer"]), record).verdict == "good"
        a, op, b = record["problem"].split()
        assert record["answer"] == (int(a) + int(b) if op == "+" else int(a) * int(b))
        assert record["prompt"] == f"What is {record['problem']}? Answer with the number only."
    held_out = arithmetic_problems(50, seed=6, exclude={r["problem"] for r in first})
    assert not {r["problem"] for r in held_out} & {r["problem"] for r in first}


def test_arithmetic_kinds():
    assert parse_kind("1+1+1") == ([1, 1, 1], ["+", "+"])
    assert evaluate([2, 3, 4], ["+", "*"]) == 14 and evaluate([9, 2, 3], ["-", "*"]) == 3
    assert kind_size("1*1") == 81 and kind_size("2+1") == 810
    text, answer = make_problem("2-2", random.Random(0))
    a, _, b = text.split()
    assert int(a) >= int(b) and answer == int(a) - int(b)
    with pytest.raises(ValueError, match="expected digit counts"):
        parse_kind("2/1")
    with pytest.raises(ValueError, match="kind 1\\*1 has 81 problems in all"):
        arithmetic_problems(200, kinds=["1*1"])
