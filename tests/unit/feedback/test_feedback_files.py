"""Feedback files: jsonl / json / csv / tsv read into records; bad records named by file, line and field, and
an import with one bad record stores nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.errors import FeedbackError
from tunelab.feedback import FeedbackImportError, FeedbackStore, read_feedback_file

GOOD = {"input": "What is 2 + 3?", "output": "5", "model": "smollm2", "verdict": "good", "source": "rule"}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def import_problems(store: FeedbackStore, path: Path) -> list[str]:
    with pytest.raises(FeedbackImportError) as err:
        store.import_(path)
    assert store.count() == 0  # nothing half-written
    return err.value.problems


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as s:
        yield s


def test_jsonl_import(store, tmp_path):
    path = write(tmp_path, "f.jsonl", jsonl(GOOD, "", {**GOOD, "verdict": None, "score": 0.5, "source": "judge"}))
    records = store.import_(path)
    assert [r.id for r in records] == [1, 2] and store.count() == 2
    assert store.get(2).score == 0.5


def test_malformed_records_are_named_by_file_line_and_field_and_nothing_is_imported(store, tmp_path):
    missing = dict(GOOD)
    del missing["output"]
    path = write(tmp_path, "bad.jsonl", jsonl(
        GOOD,                                      # 1: fine
        missing,                                   # 2: missing field
        {**GOOD, "verdict": "great"},              # 3: bad verdict
        {**GOOD, "score": "high"},                 # 4: bad score type
        '{"input": "x" "output": "y"}',            # 5: bad JSON
        GOOD,                                      # 6: fine
    ))
    problems = import_problems(store, path)
    assert problems == [
        f"{path}:2: missing field 'output'",
        f"{path}:3: field 'verdict': expected 'good', 'bad' or null, found a string \"great\"",
        f"{path}:4: field 'score': expected a number or null, found a string \"high\"",
        f"{path}:5: malformed JSON at column 15: Expecting ',' delimiter",
    ]
    with pytest.raises(FeedbackImportError) as err:
        store.import_(path)
    assert str(err.value).splitlines()[0] == f"{path}: 4 bad records, nothing imported:"


def test_one_bad_record_among_many_stores_none(store, tmp_path):
    lines = [GOOD] * 500 + [{**GOOD, "score": [1, 2]}] + [GOOD] * 10
    path = write(tmp_path, "big.jsonl", jsonl(*lines))
    assert import_problems(store, path) == [f"{path}:501: field 'score': expected a number or null, found a list"]


def test_more_than_twenty_bad_records_are_counted(tmp_path):
    path = write(tmp_path, "bad.jsonl", jsonl(*[{**GOOD, "source": "nobody"}] * 25))
    with pytest.raises(FeedbackImportError) as err:
        read_feedback_file(path)
    message = str(err.value).splitlines()
    assert message[0].endswith("25 bad records, nothing imported:")
    assert len(message) == 1 + 20 + 1 and message[-1] == "  ... and 5 more"


def test_json_array_records_are_named_by_the_line_they_start_on(store, tmp_path):
    text = "[\n" + ",\n".join(json.dumps({**GOOD, "verdict": v}, indent=2) for v in ("good", "bad", "so-so")) + "\n]\n"
    path = write(tmp_path, "f.json", text)
    start = 2 + 2 * 7  # after "[", two objects of 7 lines each (5 fields and the braces)
    assert text.splitlines()[start - 1] == "{" and '"so-so"' in text.splitlines()[start + 3]
    assert import_problems(store, path) == [
        f"{path}:{start}: field 'verdict': expected 'good', 'bad' or null, found a string \"so-so\""]
    path = write(tmp_path, "g.json", json.dumps([GOOD, GOOD]))
    assert len(store.import_(path)) == 2
    path = write(tmp_path, "one.json", json.dumps(GOOD))
    assert len(store.import_(path)) == 1
    path = write(tmp_path, "bad.json", '[{"input": 1,}]')
    assert import_problems_any(path) == [f"{path}:1: malformed JSON at column 14: Expecting property name enclosed "
                                         f"in double quotes"]


def import_problems_any(path: Path) -> list[str]:
    with pytest.raises(FeedbackImportError) as err:
        read_feedback_file(path)
    return err.value.problems


def test_csv_cells(store, tmp_path):
    path = write(tmp_path, "f.csv", (
        'input,output,model,verdict,score,source,reference,metadata,critique\n'
        '"Tag: John lives in Paris",B-PER O O B-LOC,bert,bad,0.25,gold,"[""B-PER"", ""O"", ""O"", ""O"", ""B-LOC""]",'
        '"{""split"": ""dev""}",\n'
        '"[{""role"": ""user"", ""content"": ""hi""}]",hello,llama,good,,person,,,"friendly,\nshort"\n'))
    first, second = store.import_(path)
    assert (first.score, first.reference, first.metadata, first.critique) == (
        0.25, ["B-PER", "O", "O", "O", "B-LOC"], {"split": "dev"}, None)
    assert (second.input, second.score, second.critique) == ([{"role": "user", "content": "hi"}], None,
                                                             "friendly,\nshort")


def test_csv_errors_name_line_and_field(store, tmp_path):
    path = write(tmp_path, "bad.csv", (
        'input,output,model,verdict,score,source,metadata\n'
        'a,b,m,good,0.5,person,\n'
        'a,b,m,good,lots,person,\n'
        '"two\nlines",b,m,good,1,person,{not json}\n'
        'a,b,m,,,person,\n'))
    assert import_problems(store, path) == [
        f"{path}:3: field 'score': expected a number, found a string \"lots\"",
        f"{path}:4: field 'metadata': malformed JSON at column 2: Expecting property name enclosed in double quotes",
        f"{path}:6: needs a judgement: field 'verdict' ('good' or 'bad') or field 'score', or both",
    ]
    path = write(tmp_path, "short.csv", 'input,output,model,verdict,source\na,b,m,good\n')
    with pytest.raises(FeedbackError, match=r"short.csv:2: expected 5 cells \(input, output, model, verdict, "
                                            r"source\), found 4"):
        store.import_(path)


def test_tsv(store, tmp_path):
    path = write(tmp_path, "f.tsv", 'input\toutput\tmodel\tverdict\tsource\nhe said "hi"\tok\tm\tbad\trule\n')
    (record,) = store.import_(path)
    assert record.input == 'he said "hi"'


def test_file_errors(tmp_path):
    with pytest.raises(FeedbackError, match="missing.jsonl: no such file"):
        read_feedback_file(tmp_path / "missing.jsonl")
    with pytest.raises(FeedbackError, match="empty.jsonl: the file is empty"):
        read_feedback_file(write(tmp_path, "empty.jsonl", "\n\n"))
    with pytest.raises(FeedbackError, match=r"cannot tell the format from the extension '.xml'"):
        read_feedback_file(write(tmp_path, "f.xml", "<a/>"))
    with pytest.raises(FeedbackError, match=r"f.txt: unknown feedback file format 'yaml'"):
        read_feedback_file(write(tmp_path, "f.txt", "x"), format="yaml")
    (tmp_path / "latin.jsonl").write_bytes(b'{"input": "caf\xe9"}\n')
    with pytest.raises(FeedbackError, match=r"latin.jsonl:1: not valid UTF-8 \(byte 0xe9\)"):
        read_feedback_file(tmp_path / "latin.jsonl")
    with pytest.raises(FeedbackError, match="expected a JSON array of feedback records"):
        read_feedback_file(write(tmp_path, "n.json", "3"))
    path = write(tmp_path, "f.jsonl", '["not", "an object"]\n')
    assert import_problems_any(path) == [
        f"{path}:1: expected an object with the record's fields, found a list"]
