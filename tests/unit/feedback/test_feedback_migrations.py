"""Schema versions: a store made by the first schema opens with its data kept; a newer one is refused."""

from __future__ import annotations

import re
import sqlite3
import threading

import pytest

from tunelab.errors import FeedbackError
from tunelab.feedback import FeedbackRecord, FeedbackStore, migrations

# The first released schema, frozen here: the test fails if someone edits migration 1 instead of adding one.
V1_DDL = """
PRAGMA application_id = 1414284866;
CREATE TABLE feedback (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    input         TEXT NOT NULL,
    output        TEXT NOT NULL,
    model         TEXT NOT NULL,
    model_version TEXT,
    verdict       TEXT CHECK (verdict IN ('good', 'bad')),
    score         REAL,
    critique      TEXT,
    correction    TEXT,
    source        TEXT NOT NULL CHECK (source IN ('person', 'rule', 'reward_model', 'gold', 'judge')),
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    CHECK (verdict IS NOT NULL OR score IS NOT NULL)
);
CREATE INDEX feedback_model ON feedback (model, model_version);
PRAGMA user_version = 1;
"""

V1_ROWS = [
    ("What is 2 + 3?", "6", "smollm2", "q4_1", "bad", None, "wrong sum", "5", "rule",
     "2025-01-01T10:00:00.000000Z", "2025-01-01T10:00:00.000000Z"),
    ("Say hello.", "Hello!", "smollm2", None, None, 0.9, None, None, "reward_model",
     "2025-01-02T10:00:00.000000Z", "2025-01-02T11:00:00.000000Z"),
    ("Capital of France?", "Paris.", "llama", "v1", "good", 1.0, None, None, "person",
     "2025-01-03T10:00:00.000000Z", "2025-01-03T10:00:00.000000Z"),
]


def make_v1_store(path) -> None:
    connection = sqlite3.connect(path)
    connection.executescript(V1_DDL)
    connection.executemany(
        "INSERT INTO feedback (input, output, model, model_version, verdict, score, critique, correction, source, "
        "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", V1_ROWS)
    connection.commit()
    connection.close()


def _normal(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


def test_migration_1_is_the_first_released_schema():
    statements = [_normal(s) for s in V1_DDL.split(";") if s.strip()][:-1]  # all but the user_version
    assert statements == [_normal(s) for s in migrations.SCHEMA_V1]
    assert [m.version for m in migrations.MIGRATIONS] == list(range(1, migrations.LATEST + 1))


def test_a_v1_store_is_migrated_with_its_data_kept(tmp_path):
    path = tmp_path / "old.db"
    make_v1_store(path)
    with FeedbackStore(path) as store:
        assert (store.opened_version, store.schema_version) == (1, migrations.LATEST) == (1, 2)
        records = store.query()
        assert [r.id for r in records] == [1, 2, 3]
        for record, row in zip(records, V1_ROWS):
            assert (record.input, record.output, record.model, record.model_version, record.verdict, record.score,
                    record.critique, record.correction, record.source, record.created_at,
                    record.updated_at) == row
            assert (record.task, record.reference, record.metadata) == (None, None, {})
        # the v2 fields work on the migrated store, old and new records alike
        store.update(2, task="chat", metadata={"prompt": 7}, reference="Hello there!")
        chat = store.add(FeedbackRecord(input=[{"role": "user", "content": "hi"}], output="hello", model="smollm2",
                                        verdict="good", source="person", task="chat"))
        assert chat.id == 4 and store.get(4).input == [{"role": "user", "content": "hi"}]
        assert store.get(2).metadata == {"prompt": 7}
        assert store.count(task="chat") == 2 and store.count(model="smollm2", verdict="bad") == 1
    connection = sqlite3.connect(path)
    indexes = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"feedback_model", "feedback_source", "feedback_created", "feedback_task"} <= indexes
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 2
    # v2's constraint on the new column holds for writers that bypass tunelab too
    with pytest.raises(sqlite3.IntegrityError):
        connection.execute("UPDATE feedback SET input_format = 'xml' WHERE id = 1")


def test_opening_a_migrated_store_again_changes_nothing(tmp_path):
    path = tmp_path / "old.db"
    make_v1_store(path)
    FeedbackStore(path).close()
    with FeedbackStore(path) as store:
        assert store.opened_version == 2 and store.count() == 3


def _open_at_once(path, count: int = 4) -> tuple[list[int], list[Exception]]:
    """Open the store from `count` threads (each its own connection) at the same moment."""
    errors, versions = [], []
    barrier = threading.Barrier(count)

    def open_store() -> None:
        barrier.wait()
        try:
            with FeedbackStore(path) as store:
                versions.append(store.opened_version)
        except Exception as err:  # noqa: BLE001 - reported by the caller
            errors.append(err)

    threads = [threading.Thread(target=open_store) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return versions, errors


def test_several_openers_of_a_v1_store_migrate_it_once(tmp_path):
    path = tmp_path / "old.db"
    make_v1_store(path)
    versions, errors = _open_at_once(path)
    assert errors == []
    assert sorted(versions) == [1, 2, 2, 2]  # one of them migrated; the others found v2 under the lock


def test_several_openers_of_a_new_store_create_it_once(tmp_path):
    versions, errors = _open_at_once(tmp_path / "new.db")
    assert errors == []
    assert sorted(versions) == [0, 2, 2, 2]  # one created it from nothing
    with FeedbackStore(tmp_path / "new.db") as store:
        assert store.schema_version == 2 and store.count() == 0


def test_a_failed_migration_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    make_v1_store(path)
    broken = migrations.Migration(2, "broken", ("ALTER TABLE feedback ADD COLUMN task TEXT",
                                               "ALTER TABLE no_such_table ADD COLUMN x TEXT"))
    monkeypatch.setattr(migrations, "MIGRATIONS", (migrations.MIGRATIONS[0], broken))
    with pytest.raises(FeedbackError, match=r"old.db: migrating the feedback store from schema v1 failed at v2 "
                                            r"\(broken\): no such table: no_such_table; the store is unchanged"):
        FeedbackStore(path)
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 1
    columns = [row[1] for row in connection.execute("PRAGMA table_info(feedback)")]
    assert "task" not in columns and connection.execute("SELECT count(*) FROM feedback").fetchone()[0] == 3


def test_a_store_from_a_newer_tunelab_is_refused_untouched(tmp_path):
    path = tmp_path / "new.db"
    with FeedbackStore(path) as store:
        store.add(FeedbackRecord(input="a", output="b", model="m", verdict="good", source="person"))
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 7")
    connection.commit()
    connection.close()
    with pytest.raises(FeedbackError, match=r"new.db: the feedback store has schema version 7, newer than this "
                                            r"tunelab knows \(up to 2\); upgrade tunelab"):
        FeedbackStore(path)
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 7
    assert connection.execute("SELECT count(*) FROM feedback").fetchone()[0] == 1


def test_a_database_of_another_program_is_refused(tmp_path):
    path = tmp_path / "other.db"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA application_id = 42")
    connection.execute("PRAGMA user_version = 1")
    connection.commit()
    connection.close()
    with pytest.raises(FeedbackError, match=r"another program \(application id 0x2a"):
        FeedbackStore(path)
