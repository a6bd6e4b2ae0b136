"""Feedback files: read jsonl / json / csv / tsv into validated records, write jsonl.

Reading checks every record before anything is stored, and reports all the bad ones at once, each with
its file, line and field:

    feedback.jsonl: 2 bad records, nothing imported:
      feedback.jsonl:3: field 'verdict': expected 'good', 'bad' or null, found a string 'great'
      feedback.jsonl:7: missing field 'output'

In a json file (an array of objects) the line is where the object starts. In csv / tsv every cell is
text: an empty cell is null, `score` is read as a number, and a cell of `input`, `reference` or
`metadata` that starts with '[' or '{' is read as JSON (chat messages, a list of tags, an object).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from tunelab.errors import FeedbackError
from tunelab.feedback.record import FeedbackRecord, FeedbackRecordError

FORMATS = ("jsonl", "json", "csv", "tsv")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
MAX_LISTED = 20  # bad records listed in one error message


class FeedbackImportError(FeedbackError):
    """Bad records in a feedback file; `problems` holds every one ("file:line: field 'x': ...")."""

    def __init__(self, path: Path, problems: list[str], records: int):
        self.problems = problems
        shown = problems[:MAX_LISTED]
        more = len(problems) - len(shown)
        lines = [f"{path}: {records} bad record{'s' * (records != 1)}, nothing imported:", *(f"  {p}" for p in shown)]
        if more:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))


def detect_format(path: str | Path, format: str = "auto") -> str:
    if format != "auto":
        if format not in FORMATS:
            raise FeedbackError(f"{path}: unknown feedback file format {format!r} (known: {', '.join(FORMATS)})")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise FeedbackError(f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
                            f"give it (one of {', '.join(FORMATS)})")
    return _EXTENSIONS[suffix]


def read_feedback_file(path: str | Path, format: str = "auto") -> list[FeedbackRecord]:
    """Every record of a feedback file, validated; FeedbackImportError listing all bad records if any."""
    path = Path(path)
    kind = detect_format(path, format)
    problems: list[tuple[str, str]] = []  # (file:line, what is wrong)
    text = _read_text(path)
    if kind in ("csv", "tsv"):
        items = [(where, _from_cells(row, where, problems)) for where, row in _csv_rows(path, text, kind)]
    else:
        items = _jsonl_items(path, text, problems) if kind == "jsonl" else _json_array_items(path, text, problems)
    records = []
    for where, data in items:
        if data is None:
            continue
        try:
            records.append(FeedbackRecord.from_dict(data, where))
        except FeedbackRecordError as err:
            problems += [(where, p) for p in err.problems]
    if problems:
        problems.sort(key=lambda problem: _line(problem[0]))  # stable: a record's problems keep their order
        raise FeedbackImportError(path, [f"{where}: {p}" for where, p in problems], len({w for w, _ in problems}))
    if not records:
        raise FeedbackError(f"{path}: no feedback records")
    return records


def write_jsonl(records: Iterable[FeedbackRecord], out: str | Path | IO[str]) -> int:
    """Write records as JSON lines to a path (atomically: a temporary file, then renamed) or a text stream;
    returns how many were written."""
    items = (record.to_dict() for record in records)
    if not isinstance(out, (str, Path)):
        return _write_lines(items, out)
    return write_json_lines(items, out)


def write_json_lines(items: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Mappings as JSON lines, written to a temporary name and renamed (a kill never leaves half a file);
    returns how many were written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as stream:
            count = _write_lines(items, stream)
        os.replace(tmp, path)
    except OSError as err:
        raise FeedbackError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def _write_lines(items: Iterable[Mapping[str, Any]], stream: IO[str]) -> int:
    count = 0
    for item in items:
        stream.write(json.dumps(item, ensure_ascii=False) + "\n")
        count += 1
    return count


def _read_text(path: Path) -> str:
    """A UTF-8 file's text (a BOM dropped); FeedbackError for a missing, unreadable or empty file.
    (Not tunelab.data's reader: importing tunelab.data loads torch, which the store does not need.)"""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FeedbackError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FeedbackError(f"{path}: is a directory, expected a feedback file") from None
    except OSError as err:
        raise FeedbackError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise FeedbackError(f"{path}:{line}: not valid UTF-8 (byte {raw[err.start]:#04x}); save the file as UTF-8") \
            from None
    if not text.strip():
        raise FeedbackError(f"{path}: the file is empty")
    return text


def _csv_rows(path: Path, text: str, kind: str) -> list[tuple[str, dict[str, str]]]:
    """("path:line", {column: cell}) for each non-blank row below the header; the line is where the row starts
    (a quoted cell may span lines). TSV cells are not quoted: a '"' there is an ordinary character."""
    delimiter, quoting = ("\t", csv.QUOTE_NONE) if kind == "tsv" else (",", csv.QUOTE_MINIMAL)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    rows, names, start = [], None, 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise FeedbackError(f"{path}:{reader.line_num}: malformed row: {err}") from None
        line, start = start, reader.line_num + 1
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if names is None:
            names = [name.strip() for name in row]
            if len(set(names)) != len(names) or not all(names):
                raise FeedbackError(f"{path}:{line}: header: column names must be present and different, found "
                                    f"{', '.join(names)}")
            continue
        if len(row) != len(names):
            raise FeedbackError(f"{path}:{line}: expected {len(names)} cells ({', '.join(names)}), found {len(row)}")
        rows.append((f"{path}:{line}", dict(zip(names, row))))
    return rows


def _line(where: str) -> int:
    """The line number of a "path:line" place."""
    number = where.rsplit(":", 1)[-1]
    return int(number) if number.isdigit() else 0


def _jsonl_items(path: Path, text: str, problems: list[tuple[str, str]]) -> list[tuple[str, Any]]:
    items = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            items.append((where, json.loads(line)))
        except json.JSONDecodeError as err:
            problems.append((where, f"malformed JSON at column {err.colno}: {err.msg}"))
    return items


def _json_array_items(path: Path, text: str, problems: list[tuple[str, str]]) -> list[tuple[str, Any]]:
    """The elements of a JSON array, each with the line it starts on."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        problems.append((f"{path}:{err.lineno}", f"malformed JSON at column {err.colno}: {err.msg}"))
        return []
    if isinstance(value, dict):
        value, text = [value], None  # a single record
    if not isinstance(value, list):
        raise FeedbackError(f"{path}: expected a JSON array of feedback records")
    if text is None:
        return [(f"{path}:1", value[0])]
    # The text parsed, so walking it element by element with raw_decode cannot fail.
    decoder, position, items = json.JSONDecoder(), text.index("[") + 1, []
    for element in value:
        while text[position] in " \t\r\n,":
            position += 1
        items.append((f"{path}:{text.count(chr(10), 0, position) + 1}", element))
        position = decoder.raw_decode(text, position)[1]
    return items


def _from_cells(row: dict[str, str], where: str, problems: list[tuple[str, str]]) -> dict[str, Any] | None:
    """A CSV row's text cells as record fields (see the module docstring); None if a cell is unreadable."""
    data: dict[str, Any] = {}
    ok = True
    for key, cell in row.items():
        if cell is None or cell.strip() == "":
            data[key] = None
            continue
        value: Any = cell
        if key == "score":
            try:
                value = float(cell)
            except ValueError:
                shown = json.dumps(cell, ensure_ascii=False)[:60]
                problems.append((where, f"field 'score': expected a number, found a string {shown}"))
                ok = False
        elif key in ("input", "reference", "metadata") and cell.lstrip()[:1] in ("[", "{"):
            try:
                value = json.loads(cell)
            except json.JSONDecodeError as err:
                problems.append((where, f"field '{key}': malformed JSON at column {err.colno}: {err.msg}"))
                ok = False
        data[key] = value
    return data if ok else None
