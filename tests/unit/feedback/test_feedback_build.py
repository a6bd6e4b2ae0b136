"""Training rows from the feedback store (tunelab.feedback.build): each kind's rows from hand-made records, the
rules of pairs and KTO labels, deduplication, the report, and the errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tunelab.errors import FeedbackError
from tunelab.feedback import FeedbackRecord, FeedbackStore, RowFields, build_training_data


def rec(input, output, verdict=None, *, model="m", source="person", **fields) -> FeedbackRecord:
    return FeedbackRecord(input=input, output=output, model=model, source=source, verdict=verdict, **fields)


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as opened:
        yield opened


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def build(store, kind, **kw):
    return build_training_data(store, kind, log=lambda line: None, **kw)


# ------------------------------------------------------------------------------------------------ corrections


def test_corrections_make_chat_rows_from_corrections_only(store):
    system = [{"role": "system", "content": "Be brief."}, *user("Capital of France?")]
    store.add_many([
        rec("What is 17 + 25?", "32", "bad", correction="42"),                        # 1: text input
        rec(system, "Lyon", "bad", correction="Paris", critique="wrong city"),       # 2: messages with a system turn
        rec("Name a primary colour.", "Red", "good"),                                # 3: good: kept only on request
        rec("Say hello in French.", "Hola", "bad", reference="Bonjour"),             # 4: reference only
        rec("Is it spam?", "spam", "bad", correction="ham", task="classification"),  # 5: not a text task
        rec("What is 17 + 25?", "17 + 25 = 32", "bad", correction="42"),             # 6: the same row as 1
        rec("Summarise.", "...", "bad", correction="   "),                           # 7: empty correction
        rec("Rate this.", "ok", score=0.2),                                          # 8: a score, no verdict
    ])
    result = build(store, "corrections")
    assert result.rows == [
        {"messages": [*user("What is 17 + 25?"), {"role": "assistant", "content": "42"}]},
        {"messages": [*system, {"role": "assistant", "content": "Paris"}]},
    ]
    report = result.report
    assert (report.records, report.used, report.rows, report.duplicates) == (8, 3, 2, 1)
    assert report.skipped == Counter({"good, no correction (include_good trains on good outputs)": 1,
                                      "bad, no correction": 1, "task classification (the rows are for chat)": 1,
                                      "empty correction": 1, "no verdict and no correction": 1})
    assert report.lines()[0] == "corrections (chat rows) from " + store.path + ": 8 records read, 3 used, 2 rows"

    more = build(store, "corrections", include_good=True, use_reference=True).rows
    assert more[2:] == [{"messages": [*user("Name a primary colour."), {"role": "assistant", "content": "Red"}]},
                        {"messages": [*user("Say hello in French."), {"role": "assistant", "content": "Bonjour"}]}]


def test_corrections_for_seq2seq_use_the_configs_field_names(store):
    store.add(rec("Ein Mann läuft.", "A man walks", "bad", correction="A man is running."))
    rows = build(store, "corrections", task_type="seq2seq", fields=RowFields(source="de", target="en")).rows
    assert rows == [{"de": "Ein Mann läuft.", "en": "A man is running."}]
    store.add(rec(user("Hallo"), "Hi", "bad", correction="Hello"))
    with pytest.raises(FeedbackError, match=r"record 2: field 'input': a seq2seq row's source is a text"):
        build(store, "corrections", task_type="seq2seq")


def test_filters_choose_the_records(store):
    store.add_many([rec("a?", "x", "bad", correction="A", source="gold"),
                    rec("b?", "y", "bad", correction="B", source="person", model="other")])
    assert [r["messages"][1]["content"] for r in build(store, "corrections", source="gold").rows] == ["A"]
    assert [r["messages"][1]["content"] for r in build(store, "corrections", model="other").rows] == ["B"]
    with pytest.raises(FeedbackError, match="made no training rows from 0 records \\(since=2999-01-01\\)"):
        build(store, "corrections", since="2999-01-01")


# ------------------------------------------------------------------------------------------------ relabel


def test_relabel_classification(store):
    store.add_many([
        rec("the film is a joy", "positive", "good", task="classification"),                       # 1 keeps its label
        rec("dull and far too long", "positive", "bad", correction="negative", task="classification"),  # 2
        rec("a gripping story", "negative", "bad", source="gold", reference="positive", task="classification"),  # 3
        rec("meh", "negative", "bad", task="classification"),                                     # 4 nothing to go on
        rec("the film is a joy", "positive", "bad", correction="neutral", task="classification"),  # 5 newer than 1
        rec("What is 2 + 2?", "4", "good", task="chat"),                                           # 6 another task
    ])
    result = build(store, "relabel")
    assert result.report.task == "classification"
    assert result.rows == [{"text": "dull and far too long", "label": "negative"},
                           {"text": "a gripping story", "label": "positive"},
                           {"text": "the film is a joy", "label": "neutral"}]
    assert result.labels == ["negative", "positive", "neutral"]
    assert result.report.skipped == Counter({"bad, no correction and no reference": 1,
                                             "superseded by a newer record of the same text": 1,
                                             "task chat (the rows are for classification)": 1})
    named = build(store, "relabel", fields=RowFields(text="sentence", label="y"), include_good=False,
                  use_reference=False).rows
    assert named == [{"sentence": "dull and far too long", "y": "negative"},
                     {"sentence": "the film is a joy", "y": "neutral"}]
    with pytest.raises(FeedbackError, match=r"record 5: field 'correction': unknown label 'neutral' "
                                            r"\(known: negative, positive\)"):
        build(store, "relabel", labels=["negative", "positive"])


def test_relabel_tagging(store):
    store.add_many([
        rec("John lives in Paris", "B-PER O O O", "bad", correction="B-PER O O B-LOC", task="tagging"),
        rec("Mary met Bob", "B-PER O O", "bad", source="gold", reference=["B-PER", "O", "B-PER"], task="tagging"),
        rec("New York", "B-LOC I-LOC", "good", task="tagging", metadata={"tokens": ["New", "York"]}),
    ])
    result = build(store, "relabel", fields=RowFields(tokens="words", tags="ner"))
    assert result.rows == [{"words": ["John", "lives", "in", "Paris"], "ner": ["B-PER", "O", "O", "B-LOC"]},
                           {"words": ["Mary", "met", "Bob"], "ner": ["B-PER", "O", "B-PER"]},
                           {"words": ["New", "York"], "ner": ["B-LOC", "I-LOC"]}]
    assert result.labels == ["B-PER", "O", "B-LOC", "I-LOC"]
    store.add(rec("Anna sings", "B-PER O", "bad", correction='["B-PER", "O", "O"]', task="tagging"))
    with pytest.raises(FeedbackError, match=r"record 4: field 'correction': 3 tags for 2 words \(Anna sings\)"):
        build(store, "relabel")


def test_relabel_errors_name_the_record_and_field(store):
    store.add(rec(user("classify me"), "positive", "good", task="classification"))
    with pytest.raises(FeedbackError, match=r"fb.db: record 1: field 'input': a classification record's input is "
                                            r"the text to classify \(a string\), found a list of chat messages"):
        build(store, "relabel")
    store.add(rec("x", "y", "good", task="tagging"))
    with pytest.raises(FeedbackError, match="the records are of tasks classification and tagging; choose one"):
        build(store, "relabel")


# ------------------------------------------------------------------------------------------------ pairs


def test_pairs_rules(store):
    q, other = "Capital of Australia?", "Largest planet?"
    store.add_many([
        rec(q, "Sydney", "bad", correction="Canberra."),            # 1: correction over output
        rec(user(q), "Canberra.", "good"),                          # 2: the same input given as a message
        rec(q, "Melbourne", "bad"),                                  # 3
        rec(other, "Saturn", score=2.0, source="reward_model"),     # 4: scores of one source
        rec(other, "Jupiter", score=5.0, source="reward_model"),    # 5
        rec(other, "Neptune", score=2.5, source="reward_model"),    # 6: within the margin of 4
        rec(other, "Mars", score=9.0, source="person"),             # 7: another source: not compared
        rec("Lonely?", "yes", "bad"),                                 # 8: nothing to pair with
    ])
    result = build(store, "pairs", min_margin=1.0)
    assert result.rows == [
        {"prompt": q, "chosen": "Canberra.", "rejected": "Sydney"},
        {"prompt": q, "chosen": "Canberra.", "rejected": "Melbourne"},
        {"prompt": other, "chosen": "Jupiter", "rejected": "Saturn"},
        {"prompt": other, "chosen": "Jupiter", "rejected": "Neptune"},
    ]
    report = result.report
    assert (report.records, report.used, report.rows, report.duplicates, report.contradictory) == (8, 6, 4, 1, 0)
    assert report.skipped == Counter({"nothing to pair with: no correction, and no output of the same input judged "
                                      "otherwise": 2})
    # margin 0: Neptune (2.5) over Saturn (2.0) too; at most 2 pairs per input keeps the widest margins
    rows = build(store, "pairs").rows
    assert {"prompt": other, "chosen": "Neptune", "rejected": "Saturn"} in rows
    capped = build(store, "pairs", max_pairs_per_input=2).rows
    assert [(r["chosen"], r["rejected"]) for r in capped if r["prompt"] == other] == [("Jupiter", "Saturn"),
                                                                                      ("Jupiter", "Neptune")]


def test_pairs_in_both_orders_are_dropped(store):
    store.add_many([rec("q?", "A", "good"), rec("q?", "B", "bad"),
                    rec("q?", "B", score=1.0, source="rule"), rec("q?", "A", score=0.0, source="rule")])
    with pytest.raises(FeedbackError, match="made no training rows from 4 records.*dropped 2 contradictory rows"):
        build(store, "pairs")


def test_pairs_keep_chat_prompts(store):
    conversation = [*user("Hi"), {"role": "assistant", "content": "Hello!"}, *user("Tell me a joke.")]
    store.add(rec(conversation, "No.", "bad", correction="Why did the chicken cross the road? To get to the other side."))
    assert build(store, "pairs").rows == [{"prompt": conversation, "rejected": "No.",
                                           "chosen": "Why did the chicken cross the road? To get to the other side."}]


# ------------------------------------------------------------------------------------------------ unpaired


def test_unpaired_kto_labels(store):
    store.add_many([
        rec("a?", "good answer", "good"),
        rec("b?", "bad answer", "bad", correction="better answer"),
        rec("c?", "high", score=0.9, source="reward_model"),
        rec("c?", "low", score=0.1, source="reward_model"),
        rec("d?", "same", "good"), rec("d?", "same", "bad"),
    ])
    result = build(store, "unpaired", threshold=0.5)
    assert result.rows == [
        {"prompt": "a?", "completion": "good answer", "label": True},
        {"prompt": "b?", "completion": "bad answer", "label": False},
        {"prompt": "b?", "completion": "better answer", "label": True},
        {"prompt": "c?", "completion": "high", "label": True},
        {"prompt": "c?", "completion": "low", "label": False},
    ]
    assert result.report.contradictory == 2
    assert result.report.skipped == Counter({"the same answer to the same input is judged both good and bad": 2})
    plain = build(store, "unpaired", include_corrections=False)
    assert [(r["completion"], r["label"]) for r in plain.rows] == [("good answer", True), ("bad answer", False)]
    assert plain.report.skipped["a score and no verdict (threshold labels scores)"] == 2


# ------------------------------------------------------------------------------------------------ errors


def test_errors(store, tmp_path):
    with pytest.raises(FeedbackError, match="made no training rows from 0 records: no records"):
        build(store, "pairs")
    with pytest.raises(FeedbackError, match="unknown build kind 'pair'"):
        build(store, "pair")
    with pytest.raises(FeedbackError, match="build pairs makes rows for task preference or reward_model or kto, "
                                            "not chat"):
        build(store, "pairs", task_type="chat")
    store.add(rec([*user("Hi"), {"role": "assistant", "content": "Hello"}], "How can I help?", "bad",
                  correction="Hello! How can I help?"))
    with pytest.raises(FeedbackError, match=r"fb.db: record 1: field 'input': the messages end with a assistant "
                                            r"message; the output answers the user's turn"):
        build(store, "corrections")
    store.update(1, input=[*user("Hi"), *user("again")])
    with pytest.raises(FeedbackError, match=r"record 1: field 'input': message 1 has role 'user' after user"):
        build(store, "pairs")
    with pytest.raises(FeedbackError, match="no feedback store here"):
        build_training_data(tmp_path / "missing.db", "pairs")


def test_a_store_given_by_path_is_opened_and_closed(store):
    store.add(rec("q?", "bad", "bad", correction="good"))
    result = build_training_data(store.path, "pairs", log=lambda line: None)
    assert result.rows == [{"prompt": "q?", "chosen": "good", "rejected": "bad"}]
    path = result.write(store.path + ".pairs.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == result.rows
