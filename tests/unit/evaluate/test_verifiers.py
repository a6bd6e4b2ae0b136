"""Verifiers named as module:function: loading, the forms of their answers, and the ones tunelab ships."""

from __future__ import annotations

import pytest

from tunelab.errors import ConfigError
from tunelab.evaluate.verifiers import Judgement, as_judgement, final_number, json_object, exact_match, judge, load_verifier


def test_load_by_module_and_by_file(tmp_path):
    assert load_verifier("tunelab.evaluate.verifiers:final_number") is final_number
    path = tmp_path / "checks.py"
    path.write_text("def short(output, example):\n    return len(output) <= example['limit']\n")
    short = load_verifier(f"{path}:short")
    assert judge(short, "abc", {"limit": 5}) == Judgement("good", 1.0)
    assert judge(short, "abcdef", {"limit": 5}).reward == 0.0


@pytest.mark.parametrize("spec,message", [
    ("final_number", "expected 'module:function'"),
    ("tunelab.nowhere:f", "cannot import 'tunelab.nowhere'"),
    ("tunelab.evaluate.verifiers:missing", "has no function 'missing'"),
    ("/no/such/file.py:f", "no such file"),
])
def test_bad_names_are_clear(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_verifier(spec)


def test_answer_forms():
    assert as_judgement(True) == Judgement("good", 1.0)
    assert as_judgement("bad") == Judgement("bad")
    assert as_judgement(0.25).reward == 0.25 and as_judgement(0.25).verdict is None
    assert as_judgement(("bad", "too long")) == Judgement("bad", None, "too long")
    assert as_judgement({"score": 2, "critique": "ok"}) == Judgement(None, 2.0, "ok")
    assert as_judgement("good").reward == 1.0 and as_judgement("bad").reward == 0.0
    for wrong, message in [("great", "'good' or 'bad'"), (float("nan"), "finite"), ({"verdict": "good", "x": 1}, "unknown keys"),
                           ({}, "neither"), ([1], "expected a bool")]:
        with pytest.raises(ValueError, match=message):
            as_judgement(wrong, "check")


def test_final_number():
    assert final_number("12 + 30 = 42", {"answer": 42}).verdict == "good"
    assert final_number("The answer is 1,234.", {"answer": "1234"}).verdict == "good"
    wrong = final_number("I think 41", {"answer": 42})
    assert wrong.verdict == "bad" and "41" in wrong.critique
    assert final_number("no idea", {"answer": 42}).critique == "The answer gives no number."


def test_exact_match_and_json_object():
    assert exact_match(" Positive ", {"label": "positive"}).verdict == "good"
    assert exact_match("negative", {"reference": "positive"}).critique == "The answer should be 'positive'."
    assert json_object('{"name": "x", "age": 3}', {"keys": ["name", "age"]}) == Judgement("good", 1.0)
    assert json_object('```json\n{"name": "x"}\n```', {"keys": ["name", "age"]}).score == 0.5
    assert json_object("[1, 2]", {}).verdict == "bad"
    assert "not valid JSON" in json_object("{name: x}", {}).critique
