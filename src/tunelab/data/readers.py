"""Reading data files into records that remember where they came from.

Every record carries its `source` ("path:line", or "path:#index" for the elements of a JSON array and
the rows of a parquet file, 0-based), so that a task loader that finds a bad value can say exactly where
it is: "train.jsonl:17: field 'label': unknown label 'postive' (known: negative, positive)".

Formats: jsonl (one JSON object per line), json (an array of objects), csv and tsv (a header row, or the
column names given with `columns=`), parquet (needs pyarrow) and txt (one record {"text": line} per
non-empty line).
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tunelab.errors import DataError

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "txt")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
               ".parquet": "parquet", ".txt": "txt"}

T = TypeVar("T")
PathLike = str | Path


@dataclass
class Record:
    """One row of a data file: its fields and where it is ("path:line" or "path:#index")."""

    data: dict
    source: str


def as_paths(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """One path or several, as a list of Paths (a loader accepts either)."""
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    result = [Path(p) for p in paths]
    if not result:
        raise DataError("no data files given")
    return result


def detect_format(path: PathLike, format: str = "auto") -> str:
    """The format named by `format`, or by the file's extension when it is "auto"."""
    if format != "auto":
        if format not in FORMATS:
            raise DataError(f"{path}: unknown data format {format!r} (known: {', '.join(FORMATS)})")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DataError(
            f"{path}: cannot tell the data format from the extension {suffix or '(none)'!r}; "
            f"name it with format= (one of {', '.join(FORMATS)})"
        )
    return _EXTENSIONS[suffix]


def read_text_file(path: PathLike) -> str:
    """The text of a UTF-8 file (a BOM is dropped); DataError for a missing, unreadable or empty file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {raw[err.start]:#04x}); save the file as UTF-8") from err
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def read_records(path: PathLike, format: str = "auto", *, columns: list[str] | None = None) -> list[Record]:
    """All records of one data file.

    `format` is one of jsonl, json, csv, tsv, parquet, txt, or "auto" to choose by extension. For csv/tsv,
    `columns` names the columns of a file without a header row; for parquet it selects columns.
    Raises DataError naming the file (and line) for a missing or empty file, malformed JSON, a row with the
    wrong number of columns, or an unknown format.
    """
    path = Path(path)
    kind = detect_format(path, format)
    if columns is not None and kind not in ("csv", "tsv", "parquet"):
        raise DataError(f"{path}: columns= applies to csv, tsv and parquet files, not {kind}")
    if kind == "parquet":
        return _read_parquet(path, columns)
    text = read_text_file(path)
    if kind == "jsonl":
        records = _read_jsonl(path, text)
    elif kind == "json":
        records = _read_json_array(path, text)
    elif kind == "txt":
        records = [Record({"text": line.rstrip("\r")}, f"{path}:{number}")
                   for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    else:
        records = _read_delimited(path, text, "\t" if kind == "tsv" else ",", columns)
    if not records:
        raise DataError(f"{path}: no records" + (" below the header" if kind in ("csv", "tsv") else ""))
    return records


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    decoder = json.JSONDecoder()
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = decoder.decode(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: malformed JSON at column {err.colno}: {err.msg}") from err
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, found {_json_type(value)}")
        records.append(Record(value, f"{path}:{number}"))
    return records


def _read_json_array(path: Path, text: str) -> list[Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON at column {err.colno}: {err.msg}") from err
    if isinstance(value, dict):
        hint = " (this looks like SQuAD JSON: read it with read_squad)" if "data" in value else ""
        raise DataError(f"{path}: expected a JSON array of objects, found an object{hint}")
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of objects, found {_json_type(value)}")
    records = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}:#{index}: expected a JSON object, found {_json_type(item)}")
        records.append(Record(item, f"{path}:#{index}"))
    return records


def _read_delimited(path: Path, text: str, delimiter: str, columns: list[str] | None) -> list[Record]:
    # TSV files (GLUE and friends) do not quote fields: a '"' is an ordinary character there.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    rows = _numbered_rows(reader, path)
    if columns is None:
        try:
            header_line, header = next(rows)
        except StopIteration:
            raise DataError(f"{path}: the file is empty") from None
        names = [name.strip() for name in header]
        where = f"{path}:{header_line}: header"
    else:
        names = list(columns)
        where = f"{path}: columns="
    empty = [i + 1 for i, name in enumerate(names) if not name]
    if empty:
        raise DataError(f"{where}: column {empty[0]} has no name")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"{where}: duplicate column names {', '.join(duplicates)}")

    records = []
    for number, row in rows:
        if len(row) != len(names):
            raise DataError(
                f"{path}:{number}: expected {len(names)} columns ({', '.join(names)}), found {len(row)}"
                + (" (a stray delimiter or quote?)" if len(row) > len(names) else "")
            )
        records.append(Record(dict(zip(names, row)), f"{path}:{number}"))
    return records


def _numbered_rows(reader: Any, path: Path) -> Iterable[tuple[int, list[str]]]:
    """(first line of the row, fields) for each non-blank row; csv errors become DataErrors with the line."""
    next_line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed row: {err}") from err
        first, next_line = next_line, reader.line_num + 1
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        yield first, row


def _read_parquet(path: Path, columns: list[str] | None) -> list[Record]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - pyarrow is a dependency of the data extras
        raise DataError(f"{path}: reading parquet files needs pyarrow (pip install pyarrow)") from err
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError with its own message
        raise DataError(f"{path}: not a readable parquet file: {err}") from err
    if columns is not None:
        missing = [name for name in columns if name not in table.column_names]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(table.column_names)})")
        table = table.select(list(columns))
    if table.num_rows == 0:
        raise DataError(f"{path}: the file is empty")
    return [Record(row, f"{path}:#{index}") for index, row in enumerate(table.to_pylist())]


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def require(record: Record, field: str, types: type | tuple[type, ...] | None = None) -> Any:
    """record.data[field], checked: DataError "<source>: missing field 'x'" or "...: field 'x': expected str"."""
    if field not in record.data or record.data[field] is None:
        known = ", ".join(repr(k) for k in list(record.data)[:10])
        state = "missing field" if field not in record.data else "null value for field"
        raise DataError(f"{record.source}: {state} '{field}' (fields: {known or 'none'})")
    value = record.data[field]
    if types is not None:
        allowed = types if isinstance(types, tuple) else (types,)
        # a JSON true/false is not a number, although bool subclasses int in Python
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise DataError(
                f"{record.source}: field '{field}': expected {_type_names(types)}, "
                f"found {_json_type(value)} {value!r:.60}"
            )
    return value


def optional(record: Record, field: str, types: type | tuple[type, ...] | None = None, default: Any = None) -> Any:
    """record.data[field] checked like `require`, or `default` when the field is missing or null."""
    if record.data.get(field) is None:
        return default
    return require(record, field, types)


def split_train_validation(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out `fraction` of `items` for validation, chosen by a shuffle seeded with `seed`.

    Both parts keep the original order of the items. At least one item goes to validation when fraction > 0
    and there are two items or more.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    count = len(items)
    held_out = round(count * fraction)
    if fraction > 0 and held_out == 0 and count >= 2:
        held_out = 1
    order = list(range(count))
    random.Random(seed).shuffle(order)
    validation = set(order[:held_out])
    return ([item for i, item in enumerate(items) if i not in validation],
            [item for i, item in enumerate(items) if i in validation])
