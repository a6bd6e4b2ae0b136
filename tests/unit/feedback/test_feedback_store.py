"""FeedbackStore: round trip, filters, stats, updates, and several processes writing at once."""

from __future__ import annotations

import io
import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from tunelab.errors import FeedbackError
from tunelab.feedback import FeedbackRecord, FeedbackRecordError, FeedbackStore, store_path

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"}]


def record(**fields) -> FeedbackRecord:
    values = {"input": "2 + 3?", "output": "5", "model": "smollm2", "verdict": "good", "source": "person", **fields}
    return FeedbackRecord(**values)


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "feedback.db") as s:
        yield s


def filled(store: FeedbackStore) -> list[FeedbackRecord]:
    return store.add_many([
        record(created_at="2025-01-01T10:00:00Z"),
        record(output="6", verdict="bad", source="rule", critique="2 + 3 is 5", created_at="2025-01-02T10:00:00Z"),
        record(input=CHAT, output="Lyon.", verdict="bad", source="judge", score=0.1, correction="Paris.",
               model="llama", model_version="v2", task="chat", created_at="2025-01-03T10:00:00Z"),
        record(verdict=None, score=0.8, source="reward_model", model="llama", model_version="v2", task="chat",
               created_at="2025-01-04T10:00:00Z"),
        record(verdict="good", score=1.0, source="gold", task="classification", reference="positive",
               metadata={"split": "dev"}, created_at="2025-01-05T10:00:00Z"),
    ])


def test_round_trip_keeps_every_field(store):
    original = record(input=CHAT, output="Paris.", model_version="q4_1", verdict="bad", score=0.25,
                      critique="too short", correction="The capital of France is Paris.", source="judge",
                      task="chat", reference={"answer": "Paris", "aliases": ["paris"]},
                      metadata={"judge": "llama-70b", "prompt_id": 7, "nested": {"ok": True}},
                      created_at="2025-01-31T09:15:02.123456Z")
    stored = store.add(original)
    assert stored.id == 1 and stored.updated_at == "2025-01-31T09:15:02.123456Z"
    again = store.get(stored.id)
    assert again == stored
    assert again.to_dict() == {**original.to_dict(), "id": 1, "updated_at": "2025-01-31T09:15:02.123456Z"}
    text = store.add({"input": "plain", "output": "", "model": "m", "score": 3, "source": "rule"})
    assert store.get(text.id).input == "plain" and store.get(text.id).output == ""
    assert text.created_at is not None and text.created_at == text.updated_at


def test_add_validates_and_adds_nothing_from_a_bad_batch(store):
    with pytest.raises(FeedbackRecordError, match="record 1: field 'verdict'"):
        store.add_many([{"input": "a", "output": "b", "model": "m", "verdict": "good", "source": "person"},
                        {"input": "a", "output": "b", "model": "m", "verdict": "ok", "source": "person"}])
    assert store.count() == 0


def test_filters(store):
    filled(store)
    ids = lambda **f: [r.id for r in store.query(**f)]  # noqa: E731
    assert ids() == [1, 2, 3, 4, 5]
    assert ids(model="llama") == [3, 4]
    assert ids(model="llama", model_version="v2", verdict="bad") == [3]
    assert ids(source="person") == [1]
    assert ids(source=["rule", "judge"]) == [2, 3]
    assert ids(verdict="good") == [1, 5]
    assert ids(verdict="none") == [4]
    assert ids(has_correction=True) == [3]
    assert ids(has_correction=False) == [1, 2, 4, 5]
    assert ids(has_critique=True) == [2]
    assert ids(task="chat") == [3, 4]
    assert ids(since="2025-01-03") == [3, 4, 5]
    assert ids(since="2025-01-02T10:00:00Z", until="2025-01-04") == [2, 3]
    assert ids(needs_review=True) == [2, 3, 4, 5]  # all but the person's
    assert ids(limit=2, newest_first=True) == [5, 4]
    assert store.count(model="smollm2") == 3
    with pytest.raises(FeedbackError, match="unknown source 'people'"):
        store.query(source="people")
    with pytest.raises(FeedbackError, match="unknown verdict 'meh'"):
        store.query(verdict="meh")
    with pytest.raises(FeedbackError, match="unknown filter 'modle'"):
        store.query(modle="x")
    with pytest.raises(FeedbackError, match="since: expected an ISO 8601"):
        store.query(since="soon")


def test_query_pages_through_many_records(store):
    store.add_many(record(output=str(i)) for i in range(1203))
    outputs = [r.output for r in store.iter_query()]
    assert outputs == [str(i) for i in range(1203)]
    assert [r.output for r in store.query(limit=501, newest_first=True)][-1] == str(1203 - 501)


def test_stats(store):
    filled(store)
    stats = store.stats()
    assert stats["records"] == 5
    assert stats["verdict"] == {"good": 2, "bad": 2, "none": 1}
    assert stats["source"] == {"gold": 1, "judge": 1, "person": 1, "reward_model": 1, "rule": 1}
    assert stats["task"] == {"chat": 2, "none": 2, "classification": 1}
    assert stats["score"] == {"count": 3, "mean": pytest.approx((0.1 + 0.8 + 1.0) / 3), "min": 0.1, "max": 1.0}
    assert (stats["critiques"], stats["corrections"]) == (1, 1)
    assert (stats["first"], stats["last"]) == ("2025-01-01T10:00:00.000000Z", "2025-01-05T10:00:00.000000Z")
    assert stats["models"] == [
        {"model": "smollm2", "model_version": None, "records": 3, "good": 2, "bad": 1, "scored": 1, "mean_score": 1.0},
        {"model": "llama", "model_version": "v2", "records": 2, "good": 0, "bad": 1, "scored": 2,
         "mean_score": pytest.approx(0.45)},
    ]
    assert store.stats(model="llama")["verdict"] == {"good": 0, "bad": 1, "none": 1}
    assert store.stats(model="nobody")["records"] == 0


def test_update_and_judge_keep_history(store):
    filled(store)
    updated = store.update(2, critique="the sum is 5", correction="5")
    assert (updated.critique, updated.correction, updated.verdict, updated.source) == ("the sum is 5", "5", "bad", "rule")
    assert updated.updated_at > updated.created_at and store.get(2) == updated
    judged = store.judge(3, verdict="good")
    assert (judged.verdict, judged.score, judged.source) == ("good", None, "person")
    assert judged.metadata["history"] == [
        {"verdict": "bad", "score": 0.1, "source": "judge", "replaced_at": judged.updated_at}]
    again = store.judge(3, verdict="bad", correction="Paris is the capital.")
    assert [h["source"] for h in again.metadata["history"]] == ["judge", "person"]
    with pytest.raises(FeedbackRecordError, match="record 1: field 'verdict'"):
        store.update(1, verdict="excellent")
    assert store.get(1).verdict == "good"
    with pytest.raises(FeedbackError, match="cannot update field 'created_at'"):
        store.update(1, created_at="2020-01-01")
    with pytest.raises(FeedbackError, match="no feedback record with id 99"):
        store.update(99, critique="x")
    store.delete(1)
    with pytest.raises(FeedbackError, match="no feedback record with id 1"):
        store.get(1)


def test_export_writes_every_record_as_json_lines(store, tmp_path):
    filled(store)
    out = tmp_path / "out.jsonl"
    assert store.export(out, task="chat") == 2
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == [3, 4]
    assert rows[0] == store.get(3).to_dict()
    assert list(rows[0]) == ["id", "input", "output", "model", "model_version", "verdict", "score", "critique",
                             "correction", "source", "task", "reference", "metadata", "created_at", "updated_at"]
    stream = io.StringIO()
    assert store.export(stream) == 5
    assert len(stream.getvalue().splitlines()) == 5
    assert not list(tmp_path.glob(".out.jsonl.tmp*"))


def test_export_then_import_gives_the_same_records(store, tmp_path):
    filled(store)
    store.export(tmp_path / "all.jsonl")
    with FeedbackStore(tmp_path / "other.db") as other:
        other.add(record(output="already there"))
        imported = other.import_(tmp_path / "all.jsonl")
        assert [r.id for r in imported] == [2, 3, 4, 5, 6]  # new ids in the new store
        for old, new in zip(store.query(), imported):
            assert {**old.to_dict(), "id": None} == {**other.get(new.id).to_dict(), "id": None}


def test_store_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert store_path("sqlite:///rel/f.db") == "rel/f.db"
    assert store_path("sqlite:////abs/f.db") == "/abs/f.db"
    assert store_path(Path("x.db")) == "x.db"
    with pytest.raises(FeedbackError, match="unsupported store URL"):
        store_path("postgresql://localhost/feedback")
    with FeedbackStore("sqlite:///via-url.db") as s:
        s.add(record())
    assert (tmp_path / "via-url.db").exists()
    assert sqlite3.connect(tmp_path / "via-url.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(FeedbackError, match="no feedback store here"):
        FeedbackStore("missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(FeedbackError, match="the directory nowhere does not exist"):
        FeedbackStore("nowhere/f.db")
    with pytest.raises(FeedbackError, match="is a directory"):
        FeedbackStore(tmp_path)
    (tmp_path / "notes.db").write_text("not a database at all, just some text\n" * 40)
    with pytest.raises(FeedbackError, match="notes.db: not a usable feedback store: file is not a database"):
        FeedbackStore("notes.db")
    other = sqlite3.connect(tmp_path / "app.db")
    other.execute("CREATE TABLE users (name TEXT)")
    other.commit()
    other.close()
    with pytest.raises(FeedbackError, match=r"app.db: an SQLite database with other tables \(users\)"):
        FeedbackStore("app.db")
    with FeedbackStore(":memory:") as memory:
        assert memory.add(record()).id == 1


# -- several processes at once -------------------------------------------------------------------------

WRITERS, WRITES, TICKS = 4, 200, 25


def _write(path: str, worker: int, start, shared: int) -> None:
    """A process that adds WRITES records one at a time (each its own transaction) and, after every 8th,
    appends its number to the shared record's metadata list (read, modify, write: TICKS times)."""
    store = FeedbackStore(path)
    start.wait()
    for i in range(WRITES):
        store.add(record(output=f"{worker}-{i}", metadata={"worker": worker, "i": i}))
        if i % 8 == 7:
            store.modify(shared, lambda r: {"metadata": {"ticks": [*r.metadata.get("ticks", []), worker]}})
    store.close()


def test_four_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.db")
    with FeedbackStore(path) as store:
        shared = store.add(record(model="shared")).id
    context = multiprocessing.get_context("spawn")  # not fork: the test process may have torch threads
    start = context.Event()
    processes = [context.Process(target=_write, args=(path, worker, start, shared)) for worker in range(WRITERS)]
    for p in processes:
        p.start()
    start.set()  # all at once
    for p in processes:
        p.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * WRITERS

    with FeedbackStore(path) as store:
        assert store.count(model="smollm2") == WRITERS * WRITES == 800
        written = sorted((r.metadata["worker"], r.metadata["i"]) for r in store.iter_query(model="smollm2"))
        assert written == [(w, i) for w in range(WRITERS) for i in range(WRITES)]
        # no read-modify-write was lost: every worker's TICKS appends are in the list
        ticks = store.get(shared).metadata["ticks"]
        assert sorted(ticks) == sorted(w for w in range(WRITERS) for _ in range(TICKS))
        assert WRITES // 8 == TICKS
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert connection.execute("SELECT count(*), max(id) FROM feedback").fetchone() == (801, 801)
