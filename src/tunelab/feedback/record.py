"""One piece of feedback: a judgement of one model output, with its validation.

A record says what the model was given (`input`: a text, or chat messages), what it answered (`output`),
which model did (`model`, `model_version`), and what someone or something thought of it: a `verdict`
("good" / "bad"), a `score`, or both; optionally a `critique` in words and a `correction` (the output
it should have given). `source` says who judged: a person, a rule, a reward model, a gold label or a
judge model. Records are validated when they are made, so a bad one never reaches the store, and the
messages name the field ("field 'verdict': expected 'good', 'bad' or null, found 'great'").
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import date, datetime, timedelta, timezone
from typing import Any

from tunelab.errors import FeedbackError

VERDICTS = ("good", "bad")
SOURCES = ("person", "rule", "reward_model", "gold", "judge")
REQUIRED = ("input", "output", "model", "source")
# The fields of a record in the order they are exported.
FIELDS = ("id", "input", "output", "model", "model_version", "verdict", "score", "critique", "correction", "source",
          "task", "reference", "metadata", "created_at", "updated_at")


class FeedbackRecordError(FeedbackError):
    """A record with invalid fields; `problems` lists them, each naming its field."""

    def __init__(self, where: str, problems: list[str]):
        self.where = where
        self.problems = problems
        super().__init__("; ".join(f"{where}: {p}" for p in problems))


@dataclass
class FeedbackRecord:
    """One judged model output. Construction validates every field (FeedbackRecordError)."""

    input: str | list[dict[str, Any]]
    output: str
    model: str
    source: str
    verdict: str | None = None
    score: float | None = None
    model_version: str | None = None
    critique: str | None = None
    correction: str | None = None
    task: str | None = None
    reference: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    updated_at: str | None = None
    id: int | None = None

    def __post_init__(self) -> None:
        values, problems = _check({f.name: getattr(self, f.name) for f in fields(self)})
        if problems:
            raise FeedbackRecordError("record", problems)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "record") -> "FeedbackRecord":
        """A record from a mapping (a JSON object, a CSV row): every problem is reported with `where` and its
        field; unknown fields are errors that suggest the nearest known one."""
        if not isinstance(data, Mapping):
            raise FeedbackRecordError(where, [f"expected an object with the record's fields, found {_json_type(data)}"])
        problems = []
        for key in data:
            if key not in FIELDS:
                close = difflib.get_close_matches(str(key), FIELDS, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(FIELDS)})"
                problems.append(f"unknown field '{key}'{hint}")
        for name in REQUIRED:
            if data.get(name) is None:
                problems.append(f"missing field '{name}'" if name not in data else f"field '{name}' is null")
        values, more = _check({name: data.get(name) for name in FIELDS}, skip_missing=True)
        problems += more
        if problems:
            raise FeedbackRecordError(where, problems)
        values["metadata"] = values["metadata"] if values["metadata"] is not None else {}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict, fields in export order."""
        return {name: getattr(self, name) for name in FIELDS}

    @property
    def input_text(self) -> str:
        """The input as text: chat messages as 'role: content' lines."""
        if isinstance(self.input, str):
            return self.input
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.input)


def utc_now() -> str:
    """The current time as stored: ISO 8601 in UTC with microseconds, e.g. 2025-01-31T09:15:02.123456Z."""
    return format_time(datetime.now(timezone.utc))


def format_time(moment: datetime) -> str:
    """A datetime in the stored form (naive times are taken as UTC); strings in this form sort by time."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(value: str | datetime | date, *, relative: bool = False) -> str:
    """A time in the stored form from an ISO 8601 date or date-time (a date is its midnight, UTC), a datetime,
    or with `relative`, an age such as '30m', '24h', '7d' (that long before now). ValueError if unreadable."""
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, date):
        return format_time(datetime(value.year, value.month, value.day))
    text = str(value).strip()
    match = _RELATIVE.match(text) if relative else None
    if match:
        age = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
        return format_time(datetime.now(timezone.utc) - age)
    try:
        return format_time(datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00")))
    except ValueError:
        pass
    try:
        return parse_time(date.fromisoformat(text))
    except ValueError:
        expected = "an ISO 8601 date or time (2025-01-31, 2025-01-31T09:15:00Z)"
        raise ValueError(f"expected {expected}{' or an age (30m, 24h, 7d)' if relative else ''}, "
                         f"found {text!r}") from None


def _check(values: dict[str, Any], skip_missing: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Normalised field values and the list of problems (each naming its field)."""
    out = dict(values)
    problems: list[str] = []

    def bad(name: str, expected: str) -> None:
        problems.append(f"field '{name}': expected {expected}, found {_describe(values[name])}")

    # input: a non-empty text or a non-empty list of {"role", "content"} messages
    value = values["input"]
    if isinstance(value, str):
        if not value.strip():
            problems.append("field 'input': empty text")
    elif isinstance(value, list):
        if not value:
            problems.append("field 'input': empty list of messages")
        for i, message in enumerate(value):
            if not isinstance(message, Mapping):
                problems.append(f"field 'input': message {i}: expected an object with 'role' and 'content', "
                                f"found {_describe(message)}")
                continue
            for key in ("role", "content"):
                if not isinstance(message.get(key), str) or (key == "role" and not message[key].strip()):
                    problems.append(f"field 'input': message {i}: '{key}' must be "
                                    f"{'a non-empty string' if key == 'role' else 'a string'}, "
                                    f"found {_describe(message.get(key))}")
        out["input"] = [dict(m) if isinstance(m, Mapping) else m for m in value]
    elif not (skip_missing and value is None):
        bad("input", "a string or a list of chat messages")

    for name in ("output", "model"):
        value = values[name]
        if value is None and skip_missing:
            continue
        if not isinstance(value, str):
            bad(name, "a string")
        elif name == "model" and not value.strip():
            problems.append("field 'model': empty name")

    value = values["source"]
    if isinstance(value, str):
        normal = re.sub(r"[\s-]+", "_", value.strip().lower())
        if normal in SOURCES:
            out["source"] = normal
        else:
            problems.append(f"field 'source': expected one of {', '.join(SOURCES)}, found {_describe(value)}")
    elif not (skip_missing and value is None):
        bad("source", f"one of {', '.join(SOURCES)}")

    value = values["verdict"]
    if isinstance(value, str) and value.strip().lower() in VERDICTS:
        out["verdict"] = value.strip().lower()
    elif value is not None:
        bad("verdict", "'good', 'bad' or null")

    value = values["score"]
    if value is not None:
        # JSON true/false are not scores, although bool subclasses int in Python
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad("score", "a number or null")
        elif not math.isfinite(value):
            problems.append(f"field 'score': expected a finite number, found {value}")
        else:
            out["score"] = float(value)
    if values["verdict"] is None and values["score"] is None:
        problems.append("needs a judgement: field 'verdict' ('good' or 'bad') or field 'score', or both")

    value = values["model_version"]
    if isinstance(value, int) and not isinstance(value, bool):
        out["model_version"] = str(value)
    elif value is not None and not isinstance(value, str):
        bad("model_version", "a string or null")

    for name in ("critique", "correction", "task"):
        value = values[name]
        if value is not None and not isinstance(value, str):
            bad(name, "a string or null")
    if isinstance(values["task"], str) and not values["task"].strip():
        out["task"] = None

    value = values["metadata"]
    if value is not None and not isinstance(value, Mapping):
        bad("metadata", "an object")
    elif value is not None:
        out["metadata"] = dict(value)

    value = values["reference"]
    if value is not None and not isinstance(value, (str, int, float, bool, list, dict)):
        bad("reference", "a JSON value (text, number, list or object)")

    for name in ("created_at", "updated_at"):
        value = values[name]
        if value is None:
            continue
        if not isinstance(value, (str, datetime)):
            bad(name, "an ISO 8601 date-time")
            continue
        try:
            out[name] = parse_time(value)
        except ValueError as err:
            problems.append(f"field '{name}': {err}")

    value = values["id"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        bad("id", "an integer or null")
    return out, problems


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _describe(value: Any) -> str:
    if value is None or isinstance(value, (dict, list)):
        return _json_type(value)
    try:
        shown = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        shown = repr(value)
    return f"{_json_type(value)} {shown[:60]}"
