"""The feedback store's SQLite schema, as an ordered list of migrations.

The schema version of a store is SQLite's `PRAGMA user_version`, and `PRAGMA application_id` marks the file
as a tunelab feedback store. Opening a store applies the migrations it has not had yet, all in one
transaction (a failure leaves the store as it was); a store written by a newer tunelab is refused.
A migration is never edited once released: a change to the schema is a new migration at the end.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from tunelab.errors import FeedbackError

APPLICATION_ID = int.from_bytes(b"TLFB", "big")  # PRAGMA application_id of a tunelab feedback store


@dataclass(frozen=True)
class Migration:
    version: int  # the schema version after this migration
    description: str
    statements: tuple[str, ...]


# v1, the first schema: plain-text inputs; the judgement is a verdict, a score or both.
SCHEMA_V1 = (
    f"PRAGMA application_id = {APPLICATION_ID}",
    """CREATE TABLE feedback (
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
    )""",
    "CREATE INDEX feedback_model ON feedback (model, model_version)",
)

# v2: chat-message inputs (input holds their JSON when input_format is 'messages'), the task, a gold
# reference (JSON), free metadata (a JSON object); indexes for the filters that review and export use.
SCHEMA_V2 = (
    "ALTER TABLE feedback ADD COLUMN input_format TEXT NOT NULL DEFAULT 'text' "
    "CHECK (input_format IN ('text', 'messages'))",
    "ALTER TABLE feedback ADD COLUMN task TEXT",
    "ALTER TABLE feedback ADD COLUMN reference TEXT",
    "ALTER TABLE feedback ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}'",
    "CREATE INDEX feedback_source ON feedback (source, verdict)",
    "CREATE INDEX feedback_created ON feedback (created_at)",
    "CREATE INDEX feedback_task ON feedback (task)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "first schema: text inputs, verdict and/or score, critique, correction, source", SCHEMA_V1),
    Migration(2, "chat-message inputs, task, reference, metadata; indexes on source, time, task", SCHEMA_V2),
)
LATEST = MIGRATIONS[-1].version


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection, where: str) -> int:
    """Bring the store on `conn` (autocommit mode) to the latest schema; returns the version it had.

    Several processes may open a new or old store at once: the version is read again under the write
    lock (BEGIN IMMEDIATE), so the migrations run exactly once.
    """
    found = schema_version(conn)
    _refuse_newer(found, where)
    if found == LATEST:
        return found
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = schema_version(conn)
        _refuse_newer(found, where)
        _refuse_foreign(conn, found, where)
        for migration in MIGRATIONS:
            if migration.version > found:
                try:
                    for statement in migration.statements:
                        conn.execute(statement)
                except sqlite3.DatabaseError as err:
                    raise FeedbackError(f"{where}: migrating the feedback store from schema v{found} failed at "
                                        f"v{migration.version} ({migration.description}): {err}; the store is "
                                        f"unchanged") from None
                conn.execute(f"PRAGMA user_version = {migration.version}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def _refuse_newer(version: int, where: str) -> None:
    if version > LATEST:
        raise FeedbackError(f"{where}: the feedback store has schema version {version}, newer than this tunelab "
                            f"knows (up to {LATEST}); upgrade tunelab to use it")


def _refuse_foreign(conn: sqlite3.Connection, version: int, where: str) -> None:
    """An SQLite file that some other program made is not taken over."""
    app = conn.execute("PRAGMA application_id").fetchone()[0]
    if app not in (0, APPLICATION_ID) or (version > 0 and app != APPLICATION_ID):
        raise FeedbackError(f"{where}: an SQLite database of another program (application id {app:#x}, "
                            f"user_version {version}), not a tunelab feedback store")
    if version == 0:
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        if tables:
            raise FeedbackError(f"{where}: an SQLite database with other tables ({', '.join(tables[:5])}), not a "
                                f"tunelab feedback store; give a new file or an existing store")
