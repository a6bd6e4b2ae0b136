"""tunelab feedback import | export | stats | review, in process (main()) and one real process with piped stdin."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli.main import main
from tunelab.feedback import FeedbackStore

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "data" / "feedback" / "smollm2_answers.jsonl"


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Run in an empty directory (the default store is ./feedback.db)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["feedback", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_import_then_stats(here, capsys):
    code, out, _ = run(capsys, "import", str(EXAMPLE))
    assert code == 0
    assert out == f"imported 8 records from {EXAMPLE} into feedback.db (8 in the store)\n"
    code, out, _ = run(capsys, "stats")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("feedback.db: 8 records, schema v2, created ")
    assert lines[1:7] == [
        "  verdicts     good 3 (37.5%), bad 5 (62.5%)",
        "  sources      gold 6 (75.0%), rule 2 (25.0%)",
        "  tasks        chat 8 (100.0%)",
        "  critiques    0",
        "  corrections  0",
        "",
    ]
    assert lines[7:] == ["  model                  version  records  good  bad  mean score",
                         "  smollm2-135m-instruct  Q4_1           8     3    5           -"]
    code, out, _ = run(capsys, "stats", "--json", "--source", "gold")
    stats = json.loads(out)
    assert (stats["records"], stats["verdict"], stats["schema_version"]) == (6, {"good": 3, "bad": 3, "none": 0}, 2)


def test_import_of_a_bad_file_reports_every_record_and_creates_nothing(here, capsys):
    good = json.loads(EXAMPLE.read_text(encoding="utf-8").splitlines()[0])
    (here / "bad.jsonl").write_text("\n".join([
        json.dumps(good), json.dumps({**good, "verdict": "fine"}), json.dumps({**good, "score": "0.5"}),
        "{oops", json.dumps({k: v for k, v in good.items() if k != "model"})]) + "\n", encoding="utf-8")
    code, out, err = run(capsys, "import", "bad.jsonl", str(EXAMPLE))
    assert code == 1 and out == ""
    assert err == (
        "tunelab: error: bad.jsonl: 4 bad records, nothing imported:\n"
        "  bad.jsonl:2: field 'verdict': expected 'good', 'bad' or null, found a string \"fine\"\n"
        "  bad.jsonl:3: field 'score': expected a number or null, found a string \"0.5\"\n"
        "  bad.jsonl:4: malformed JSON at column 2: Expecting property name enclosed in double quotes\n"
        "  bad.jsonl:5: missing field 'model'\n")
    assert not (here / "feedback.db").exists()


def test_export_with_filters(here, capsys):
    run(capsys, "import", str(EXAMPLE), "--store", "sqlite:///fb.db")
    code, out, _ = run(capsys, "export", "--store", "fb.db", "--verdict", "bad", "--source", "gold")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [row["reference"] for row in rows] == ["42", "Bonjour", "Jupiter"]
    assert rows[0]["input"] == [{"role": "user", "content": "What is 17 + 25? Answer with the number only."}]
    code, out, _ = run(capsys, "export", "--store", "fb.db", "--out", "all.jsonl")
    assert out == "exported 8 records to all.jsonl\n"
    assert len((here / "all.jsonl").read_text(encoding="utf-8").splitlines()) == 8
    code, out, _ = run(capsys, "export", "--store", "fb.db", "--since", "1d", "--until", "2000-01-01")
    assert code == 0 and out == ""


def test_review_from_scripted_stdin(here, capsys, monkeypatch):
    run(capsys, "import", str(EXAMPLE))
    script = "a\nr\nc\nsays 32 where 17 + 25 is 42\n\ne\n42\n\nq\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, _ = run(capsys, "review", "--limit", "5")
    assert code == 0
    assert "record 1 (1 of 5) | model smollm2-135m-instruct Q4_1 | task chat | gold: good" in out
    assert "input:\n    user: What is the capital of Australia? Answer in one sentence.\n" \
           "output:\n    The capital of Australia is Canberra.\nreference:\n    Canberra\n" in out
    assert out.splitlines()[-1] == "reviewed 4 of 8 records: 1 accepted, 1 rejected, 1 corrected, 1 critiqued, " \
                                   "0 skipped"
    with FeedbackStore("feedback.db") as store:
        one, two, three = store.get(1), store.get(2), store.get(3)
        assert (one.verdict, one.source) == ("good", "person")
        assert (two.verdict, two.source) == ("bad", "person")  # a person disagreed with the gold check
        assert (three.critique, three.correction, three.verdict, three.source) == (
            "says 32 where 17 + 25 is 42", "42", "bad", "person")
        assert store.get(4).source == "gold"  # shown, then quit: untouched


def test_review_with_nothing_to_do(here, capsys, monkeypatch):
    (here / "done.jsonl").write_text(json.dumps(
        {"input": "hi", "output": "hello", "model": "m", "verdict": "good", "source": "person"}) + "\n")
    run(capsys, "import", "done.jsonl")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, _ = run(capsys, "review")
    assert code == 0 and out == ("nothing to review in feedback.db: each of its 1 records has a person's verdict "
                                 "(and a correction if bad)\n")


def test_store_from_a_training_config(here, capsys):
    base = ("output_dir: runs/x\nmodel: {source: minilm-l6}\ntask: {type: classification}\n"
            "data: {train: train.jsonl}\n")
    (here / "with.yaml").write_text(base + "feedback: {store: runs-feedback.db}\n")
    (here / "without.yaml").write_text(base)
    (here / "typo.yaml").write_text(base + "feedback: {stor: x.db}\n")
    assert run(capsys, "import", str(EXAMPLE), "--config", "with.yaml")[0] == 0
    assert (here / "runs-feedback.db").exists() and not (here / "feedback.db").exists()
    code, out, _ = run(capsys, "stats", "--config", "with.yaml", "--json")
    assert json.loads(out)["store"] == "runs-feedback.db"
    code, _, err = run(capsys, "stats", "--config", "without.yaml")
    assert code == 1 and "without.yaml: no feedback section (feedback: {store: PATH}); or give --store" in err
    code, _, err = run(capsys, "stats", "--config", "typo.yaml")
    assert code == 1 and "feedback.stor: unknown key; did you mean 'feedback.store'?" in err


def test_errors_are_one_clear_line(here, capsys):
    code, _, err = run(capsys, "stats")
    assert code == 1 and err == ("tunelab: error: feedback.db: no feedback store here (create one with "
                                 "`tunelab feedback import FILE --store feedback.db`)\n")
    code, _, err = run(capsys, "export", "--store", "postgresql://db/feedback")
    assert code == 1 and "unsupported store URL" in err
    run(capsys, "import", str(EXAMPLE))
    code, _, err = run(capsys, "export", "--since", "last tuesday")
    assert code == 1 and err.startswith("tunelab: error: since: expected an ISO 8601 date or time")
    with pytest.raises(SystemExit):
        main(["feedback", "stats", "--verdict", "meh"])


def test_review_in_a_real_process_with_piped_stdin(here, capsys):
    run(capsys, "import", str(EXAMPLE))
    result = subprocess.run([sys.executable, "-m", "tunelab", "feedback", "review", "--unjudged", "--model",
                             "smollm2-135m-instruct"], input="s\ns\ns\ne\nBonjour !\n\nq\n", capture_output=True,
                            text=True, timeout=120, cwd=here)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == ("reviewed 5 of 8 records: 0 accepted, 0 rejected, 1 corrected, "
                                              "0 critiqued, 3 skipped")
    with FeedbackStore(here / "feedback.db") as store:
        french = store.get(4)
        assert "good morning" in french.input[0]["content"]
        assert (french.correction, french.verdict, french.source) == ("Bonjour !", "bad", "person")
        assert store.count(source="person") == 1
