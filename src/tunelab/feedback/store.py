"""The feedback store: feedback records in an SQLite file that several processes can write at once.

    store = FeedbackStore("feedback.db")                 # or "sqlite:///feedback.db"; created if new
    store.add(FeedbackRecord(input="2 + 3?", output="6", model="smollm2", verdict="bad", source="rule"))
    store.query(model="smollm2", verdict="bad", has_correction=False)
    store.update(7, correction="5")

Concurrency: the file is in WAL mode (readers never block the writer, nor the writer the readers), every
write is one `BEGIN IMMEDIATE` transaction (it takes the write lock first, so two writers never both read
and then both write), and a writer that finds the lock taken waits for it up to `timeout` seconds (SQLite's
busy timeout) instead of failing. So processes that write at the same time (a training job's collector,
`tunelab feedback review`, the server's feedback page) lose nothing. An import is one transaction: all of
its records or none.

The schema is versioned (migrations.py): opening a store of an older tunelab upgrades it in place, and a
store of a newer tunelab is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tunelab.errors import FeedbackError
from tunelab.feedback import migrations
from tunelab.feedback.files import read_feedback_file, write_jsonl
from tunelab.feedback.record import SOURCES, VERDICTS, FeedbackRecord, FeedbackRecordError, parse_time, utc_now

DEFAULT_STORE = "feedback.db"
# Columns in the order of the SELECTs below (all of schema v2).
_COLUMNS = ("id", "input", "input_format", "output", "model", "model_version", "verdict", "score", "critique",
            "correction", "source", "task", "reference", "metadata", "created_at", "updated_at")
# What `tunelab feedback review` shows: no person's verdict yet, a bad verdict that has no correction, or a
# correction that a model wrote (a refinement, feedback/build.py) and no person has reviewed yet.
_UNREVIEWED_REFINEMENT = "json_extract(metadata, '$.refinement.reviewed') = 0"
_NEEDS_REVIEW = f"source != 'person' OR (verdict = 'bad' AND correction IS NULL) OR {_UNREVIEWED_REFINEMENT}"
_PAGE = 500  # rows read at a time by iter_query
_UPDATABLE = ("input", "output", "model", "model_version", "verdict", "score", "critique", "correction", "source",
              "task", "reference", "metadata", "updated_at")


def store_path(location: str | Path) -> str:
    """The file of a store given as a path or an `sqlite:///path` URL (`sqlite:////abs/path` is absolute,
    as in SQLAlchemy); ':memory:' is a private in-memory store."""
    text = str(location)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme.lower() != "sqlite":
            raise FeedbackError(f"{text}: unsupported store URL; the feedback store is SQLite: a file path or "
                                f"sqlite:///path/to/feedback.db")
        if not rest.startswith("/") or rest == "/":
            raise FeedbackError(f"{text}: an SQLite URL is sqlite:///relative/path.db or sqlite:////absolute/path.db")
        text = rest[1:]
    if not text:
        raise FeedbackError("empty feedback store path")
    return text


class FeedbackStore:
    """Feedback records in SQLite. Thread-safe; for several processes, each opens its own store."""

    def __init__(self, location: str | Path = DEFAULT_STORE, *, create: bool = True, timeout: float = 60.0,
                 durable: bool = False):
        """Open (and with `create`, make) the store at a path or sqlite:/// URL; a writer waits up to `timeout`
        seconds for another's transaction to end. `durable`: every commit is flushed to the disk (fsync,
        about 10 ms each); by default (WAL with synchronous=NORMAL) a killed process loses nothing and the
        file is never corrupted, but a power cut can undo the last commits."""
        self.path = store_path(location)
        self.timeout = timeout
        memory = self.path == ":memory:"
        if not memory:
            file = Path(self.path)
            if file.is_dir():
                raise FeedbackError(f"{file}: is a directory; a feedback store is a file (e.g. {file / DEFAULT_STORE})")
            if not file.exists():
                if not create:
                    raise FeedbackError(f"{file}: no feedback store here (create one with "
                                        f"`tunelab feedback import FILE --store {file}`)")
                if not file.parent.is_dir():
                    raise FeedbackError(f"{file}: the directory {file.parent} does not exist")
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as err:
            raise FeedbackError(f"{self.path}: cannot open the feedback store: {err}") from None
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            if not memory:
                self._wal()
            self.opened_version = migrations.migrate(self._conn, self.path)
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise FeedbackError(f"{self.path}: not a usable feedback store: {err}") from None
        except BaseException:
            self._conn.close()
            raise

    def _wal(self) -> None:
        """Switch to WAL mode (once per file: the mode is kept in the file). Changing the mode needs a moment
        alone with the file, which SQLite does not wait for: retry until the busy timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if mode.lower() != "wal":
            raise FeedbackError(f"{self.path}: SQLite cannot use WAL mode here (journal mode {mode}); "
                                f"put the store on a local file system")

    # -- life cycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeedbackStore({self.path!r})"

    @property
    def schema_version(self) -> int:
        with self._lock:
            return migrations.schema_version(self._conn)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's write lock from its start (waits for it up to the timeout)."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                raise FeedbackError(f"{self.path}: could not get the write lock in {self.timeout:g} s: {err}") from None
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- writing ---------------------------------------------------------------------------------------

    def add(self, record: FeedbackRecord | Mapping[str, Any]) -> FeedbackRecord:
        """Store one record (a FeedbackRecord or a dict of its fields); returns it with its id and times."""
        (stored,) = self.add_many([record])
        return stored

    def add_many(self, records: Iterable[FeedbackRecord | Mapping[str, Any]]) -> list[FeedbackRecord]:
        """Store records in one transaction (all or none); each gets a new id, and created_at / updated_at
        now unless it has them. Returns the stored records."""
        now = utc_now()
        prepared = []
        for i, record in enumerate(records):
            record = record if isinstance(record, FeedbackRecord) else FeedbackRecord.from_dict(record, f"record {i}")
            record = dataclasses.replace(record, id=None, created_at=record.created_at or now,
                                         updated_at=record.updated_at or record.created_at or now)
            prepared.append(record)
        stored = []
        with self._write() as conn:
            for record in prepared:
                row = _to_row(record)
                del row["id"]
                cursor = conn.execute(f"INSERT INTO feedback ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                                      tuple(row.values()))
                stored.append(dataclasses.replace(record, id=cursor.lastrowid))
        return stored

    def update(self, id: int, **changes: Any) -> FeedbackRecord:
        """Change fields of record `id` (e.g. critique=..., correction=...); updated_at becomes now.
        The changed record is validated first; returns it."""
        unknown = [name for name in changes if name not in _UPDATABLE]
        if unknown:
            raise FeedbackError(f"cannot update field '{unknown[0]}' (updatable: {', '.join(_UPDATABLE)})")
        return self.modify(id, lambda record: changes)

    def modify(self, id: int, change: Callable[[FeedbackRecord], Mapping[str, Any]]) -> FeedbackRecord:
        """Read record `id` and write `change(record)`'s fields back, in one transaction: nobody writes in
        between, so a change computed from the record (a list appended to) is never lost."""
        with self._write() as conn:
            old = self._get(conn, id)
            fields = dict(change(old))
            fields.setdefault("updated_at", utc_now())
            try:
                new = dataclasses.replace(old, **fields)  # validates
            except FeedbackRecordError as err:
                raise FeedbackRecordError(f"{self.path}: record {id}", err.problems) from None
            row = {key: value for key, value in _to_row(new).items() if key not in ("id", "created_at")}
            conn.execute(f"UPDATE feedback SET {', '.join(f'{k} = ?' for k in row)} WHERE id = ?",
                         (*row.values(), id))
        return new

    def judge(self, id: int, *, verdict: str | None, score: float | None = None, source: str = "person",
              **changes: Any) -> FeedbackRecord:
        """Give record `id` a new judgement (verdict and/or score from `source`), e.g. a person's over a judge
        model's. The judgement it replaces is kept in metadata["history"] (verdict, score, source, and when it
        was replaced)."""
        now = utc_now()

        def change(record: FeedbackRecord) -> dict[str, Any]:
            previous = {"verdict": record.verdict, "score": record.score, "source": record.source, "replaced_at": now}
            metadata = dict(record.metadata)
            metadata["history"] = [*metadata.get("history", []), previous]
            return {"updated_at": now, **changes, "verdict": verdict, "score": score, "source": source,
                    "metadata": metadata}

        return self.modify(id, change)

    def delete(self, id: int) -> None:
        """Remove record `id`."""
        with self._write() as conn:
            if conn.execute("DELETE FROM feedback WHERE id = ?", (id,)).rowcount == 0:
                raise FeedbackError(f"{self.path}: no feedback record with id {id}")

    def import_(self, path: str | Path, format: str = "auto") -> list[FeedbackRecord]:
        """Store every record of a jsonl / json / csv / tsv file, in one transaction. Every record is
        validated first: one bad record and nothing is stored (FeedbackImportError lists them all)."""
        return self.add_many(read_feedback_file(path, format))

    # -- reading ---------------------------------------------------------------------------------------

    def get(self, id: int) -> FeedbackRecord:
        with self._lock:
            return self._get(self._conn, id)

    def _get(self, conn: sqlite3.Connection, id: int) -> FeedbackRecord:
        row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM feedback WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise FeedbackError(f"{self.path}: no feedback record with id {id}")
        return _from_row(row)

    def query(self, *, limit: int | None = None, newest_first: bool = False, **filters: Any) -> list[FeedbackRecord]:
        """Records that pass every filter, oldest first (by id). Filters: model, model_version, source (one or
        a list), verdict ('good', 'bad', 'none': score only), task, has_correction, has_critique, since and
        until (ISO dates or times, or a datetime; by created_at), unjudged (no person's verdict yet),
        needs_review (unjudged, or a bad verdict without a correction)."""
        return list(self.iter_query(limit=limit, newest_first=newest_first, **filters))

    def iter_query(self, *, limit: int | None = None, newest_first: bool = False,
                   **filters: Any) -> Iterator[FeedbackRecord]:
        """`query`, one record at a time (for exports of large stores)."""
        where, params = _where(filters)
        # Pages by id (keyset pagination): each page is a short read, so no lock is held between records.
        after = "id < ?" if newest_first else "id > ?"
        sql = (f"SELECT {', '.join(_COLUMNS)} FROM feedback{where}{' AND ' if where else ' WHERE '}{after} "
               f"ORDER BY id{' DESC' * newest_first} LIMIT ?")
        last, left = (2**63 - 1 if newest_first else -1), (limit if limit is not None else 2**63 - 1)
        while left > 0:
            with self._lock:
                rows = self._conn.execute(sql, (*params, last, min(left, _PAGE))).fetchall()
            for row in rows:
                yield _from_row(row)
            if len(rows) < min(left, _PAGE):
                return
            last, left = rows[-1][0], left - len(rows)

    def count(self, **filters: Any) -> int:
        where, params = _where(filters)
        with self._lock:
            return self._conn.execute(f"SELECT count(*) FROM feedback{where}", params).fetchone()[0]

    def stats(self, **filters: Any) -> dict[str, Any]:
        """Counts of the records that pass the filters: by verdict, source, task and model (with each
        model's verdicts and mean score), scores (count, mean, min, max), critiques, corrections, first and
        last times."""
        where, params = _where(filters)
        with self._lock:
            def rows(sql: str) -> list[tuple]:
                return self._conn.execute(sql.format(where=where), params).fetchall()

            (total, scored, mean, low, high, critiques, corrections, first, last), = rows(
                "SELECT count(*), count(score), avg(score), min(score), max(score), count(critique), "
                "count(correction), min(created_at), max(created_at) FROM feedback{where}")
            verdicts = dict(rows("SELECT coalesce(verdict, 'none'), count(*) FROM feedback{where} GROUP BY 1"))
            sources = dict(rows("SELECT source, count(*) FROM feedback{where} GROUP BY 1 ORDER BY 2 DESC, 1"))
            tasks = dict(rows("SELECT coalesce(task, 'none'), count(*) FROM feedback{where} GROUP BY 1 "
                              "ORDER BY 2 DESC, 1"))
            models = rows("SELECT model, coalesce(model_version, ''), count(*), sum(verdict = 'good'), "
                          "sum(verdict = 'bad'), count(score), avg(score) FROM feedback{where} "
                          "GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2")
        return {
            "records": total,
            "verdict": {name: verdicts.get(name, 0) for name in (*VERDICTS, "none")},
            "source": sources,
            "task": tasks,
            "models": [{"model": m, "model_version": v or None, "records": n, "good": good or 0, "bad": bad or 0,
                        "scored": s, "mean_score": avg} for m, v, n, good, bad, s, avg in models],
            "score": {"count": scored, "mean": mean, "min": low, "max": high},
            "critiques": critiques,
            "corrections": corrections,
            "first": first,
            "last": last,
        }

    def export(self, out: str | Path | IO[str], **filters: Any) -> int:
        """Write the records that pass the filters as JSON lines (every field, `id` included) to a path
        (written to a temporary name, then renamed) or a text stream; returns how many."""
        return write_jsonl(self.iter_query(**filters), out)


def _to_row(record: FeedbackRecord) -> dict[str, Any]:
    messages = not isinstance(record.input, str)
    return {
        "id": record.id,
        "input": json.dumps(record.input, ensure_ascii=False) if messages else record.input,
        "input_format": "messages" if messages else "text",
        "output": record.output, "model": record.model, "model_version": record.model_version,
        "verdict": record.verdict, "score": record.score, "critique": record.critique,
        "correction": record.correction, "source": record.source, "task": record.task,
        "reference": None if record.reference is None else json.dumps(record.reference, ensure_ascii=False),
        "metadata": json.dumps(record.metadata, ensure_ascii=False),
        "created_at": record.created_at, "updated_at": record.updated_at,
    }


def _from_row(row: tuple) -> FeedbackRecord:
    values = dict(zip(_COLUMNS, row))
    if values.pop("input_format") == "messages":
        values["input"] = json.loads(values["input"])
    values["reference"] = None if values["reference"] is None else json.loads(values["reference"])
    values["metadata"] = json.loads(values["metadata"])
    return FeedbackRecord(**values)


def _where(filters: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """The WHERE clause and its parameters for query filters; FeedbackError for an unknown filter or value."""
    clauses: list[str] = []
    params: list[Any] = []
    for name, value in filters.items():
        if value is None:
            continue
        if name in ("model", "model_version", "task"):
            clauses.append(f"{name} = ?")
            params.append(value)
        elif name == "source":
            sources = [value] if isinstance(value, str) else list(value)
            for source in sources:
                if source not in SOURCES:
                    raise FeedbackError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
            clauses.append(f"source IN ({', '.join('?' * len(sources))})")
            params += sources
        elif name == "verdict":
            if value == "none":
                clauses.append("verdict IS NULL")
            elif value in VERDICTS:
                clauses.append("verdict = ?")
                params.append(value)
            else:
                raise FeedbackError(f"unknown verdict {value!r} (known: good, bad, none)")
        elif name in ("has_correction", "has_critique"):
            column = name.removeprefix("has_")
            clauses.append(f"{column} IS {'NOT ' * bool(value)}NULL")
        elif name in ("since", "until"):
            try:
                moment = parse_time(value, relative=True)
            except ValueError as err:
                raise FeedbackError(f"{name}: {err}") from None
            clauses.append(f"created_at {'>=' if name == 'since' else '<'} ?")
            params.append(moment)
        elif name in ("needs_review", "unjudged"):
            condition = "source != 'person'" if name == "unjudged" else _NEEDS_REVIEW
            clauses.append(f"({condition})" if value else f"NOT ({condition})")
        else:
            raise FeedbackError(f"unknown filter {name!r} (known: model, model_version, source, verdict, task, "
                                f"has_correction, has_critique, since, until, unjudged, needs_review)")
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), params
