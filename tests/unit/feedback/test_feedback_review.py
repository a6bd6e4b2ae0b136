"""The review loop, scripted: what it shows, what each key writes, and that answers are saved at once."""

from __future__ import annotations

import pytest

from tunelab.feedback import FeedbackRecord, FeedbackStore
from tunelab.feedback.review import review, show


def record(**fields) -> FeedbackRecord:
    values = {"input": "2 + 3?", "output": "6", "model": "smollm2", "verdict": "bad", "source": "rule", **fields}
    return FeedbackRecord(**values)


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as s:
        s.add_many([
            record(),                                                                # 1 rule: bad
            record(output="5", verdict="good", source="person"),                     # 2 a person's: done
            record(output="7", verdict=None, score=0.2, source="reward_model"),      # 3
            record(input=[{"role": "user", "content": "Capital of France?"}], output="Lyon", source="judge",
                   reference="Paris", critique="wrong city", model="llama"),         # 4
            record(output="8", verdict="bad", source="person"),                      # 5 a person's bad, no correction
            record(output="9", verdict="bad", source="person", correction="5"),      # 6 done
        ])
        yield s


def scripted(lines: list[str]):
    """read_line and write functions over a script; `out` collects what was written."""
    answers = iter(lines)
    out: list[str] = []

    def read_line(prompt: str) -> str | None:
        out.append(prompt)
        return next(answers, None)

    return read_line, out.append, out


def test_review_writes_each_answer(store):
    read_line, write, out = scripted([
        "a",                                       # 1 accepted
        "c", "the sum is off by two", "", "r",     # 3 critique, then rejected
        "e", "The capital of France is Paris.", "It is on the Seine.", "",   # 4 corrected
        "s",                                       # 5 skipped
    ])
    summary, waiting = review(store, read_line, write)
    assert waiting == 4 and summary.shown == 4 and not summary.quit
    assert (summary.accepted, summary.rejected, summary.critiqued, summary.corrected, summary.skipped) == (
        [1], [3], [3], [4], [5])
    one, three, four, five = (store.get(i) for i in (1, 3, 4, 5))
    assert (one.verdict, one.source, one.metadata["history"][0]["source"]) == ("good", "person", "rule")
    assert (three.verdict, three.score, three.source, three.critique) == ("bad", None, "person",
                                                                          "the sum is off by two")
    assert three.metadata["history"] == [{"verdict": None, "score": 0.2, "source": "reward_model",
                                          "replaced_at": three.updated_at}]
    assert (four.verdict, four.source, four.correction) == ("bad", "person",
                                                            "The capital of France is Paris.\nIt is on the Seine.")
    assert four.critique == "wrong city"  # kept
    assert five == store.get(5) and five.updated_at == five.created_at  # skipping writes nothing
    # left: the rejected one (bad, no correction yet) and the skipped one
    assert [r.id for r in store.query(needs_review=True)] == [3, 5]


def test_quit_and_end_of_input_keep_what_was_answered(store):
    read_line, write, _ = scripted(["r", "q"])
    summary, _ = review(store, read_line, write)
    assert summary.quit and summary.rejected == [1] and summary.shown == 2
    assert store.get(1).source == "person" and store.get(3).source == "reward_model"
    # a bad verdict without a correction stays in the queue (unless only unjudged records are asked for)
    read_line, write, _ = scripted(["e", "5", "", "a"])  # then the input ends
    summary, waiting = review(store, read_line, write)
    assert waiting == 4 and summary.corrected == [1] and summary.accepted == [3] and summary.quit
    read_line, write, _ = scripted([])
    assert review(store, read_line, write)[1] == 2  # 4 and 5
    assert review(store, read_line, write, unjudged_only=True)[1] == 1  # 4


def test_unknown_keys_and_empty_texts_ask_again(store):
    read_line, write, out = scripted(["x", "", "c", "", "accept"])
    summary, _ = review(store, read_line, write, limit=1)
    assert summary.accepted == [1] and summary.critiqued == []
    assert "unknown answer 'x': a, r, c, e, s or q\n" in out and "  nothing written\n" in out
    assert store.get(1).critique is None


def test_filters_and_limit(store):
    read_line, write, _ = scripted(["s", "s", "s"])
    summary, waiting = review(store, read_line, write, model="llama")
    assert waiting == 1 and summary.skipped == [4]
    read_line, write, _ = scripted(["s", "s", "s"])
    summary, waiting = review(store, read_line, write, limit=2)
    assert waiting == 4 and summary.skipped == [1, 3]


def test_a_record_reviewed_elsewhere_meanwhile_is_not_shown(store, tmp_path):
    def read_line(prompt: str) -> str | None:
        # while the person looks at record 1, someone on the feedback page judges record 3
        with FeedbackStore(tmp_path / "feedback.db") as other:
            other.judge(3, verdict="good")
        return "s" if "[a]ccept" in prompt else None

    summary, waiting = review(store, read_line, lambda text: None)
    assert waiting == 4 and summary.skipped == [1, 4, 5] and summary.shown == 3


def test_show_prints_input_output_reference_and_judgement(store):
    text = show(store.get(4), 2, 4)
    assert "record 4 (2 of 4) | model llama | judge: bad" in text
    assert "input:\n    user: Capital of France?\noutput:\n    Lyon\nreference:\n    Paris\ncritique:\n    wrong city" \
        in text
    assert "rule: bad" in show(store.get(1), 1, 1) and "reward_model: score 0.2" in show(store.get(3), 1, 1)
    assert "output:\n    (empty)" in show(store.add(record(output="")), 1, 1)
