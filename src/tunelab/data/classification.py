"""Sequence classification data (sentiment, NLI pairs): load, validate labels, encode.

A label in a file may be a name ("positive") or an id (1, or "1" in a csv/tsv). With a given label list a
value is looked up by name first, then taken as an index into the list. Without one, the labels are
discovered: integers (or strings of digits) sort numerically and are named str(int), so SST-2's 0/1 become
["0", "1"]; other names sort alphabetically.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunelab.data.encoded import EncodedDataset
from tunelab.data.readers import PathLike, Record, as_paths, read_records, require
from tunelab.errors import DataError

if TYPE_CHECKING:
    from tunelab.tokenizer import Tokenizer


_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")


@dataclass
class ClassificationExample:
    """A text (and optional second text) with its label id (None for unlabeled data)."""

    text: str
    pair: str | None
    label: int | None
    source: str


def load_classification(paths: PathLike | Iterable[PathLike], *, format: str = "auto", text_field: str = "text",
                        pair_field: str | None = None, label_field: str | None = "label",
                        labels: list[str] | None = None,
                        columns: list[str] | None = None) -> tuple[list[ClassificationExample], list[str]]:
    """Examples and the label names of one or more files (label_field=None reads unlabeled text).

    Raises DataError naming file, line and field for a missing or empty text, a missing label, or (with
    `labels` given) a label that is not in the list.
    """
    records = [record for path in as_paths(paths) for record in read_records(path, format, columns=columns)]
    if labels is not None:
        names = [str(name) for name in labels]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise DataError(f"labels: duplicate label names {', '.join(duplicates)}")
        if not names:
            raise DataError("labels: the label list is empty")

    raw_labels: list[str | int | None] = []
    examples = []
    for record in records:
        text = _text(record, text_field)
        pair = _text(record, pair_field) if pair_field is not None else None
        raw_labels.append(_raw_label(record, label_field) if label_field is not None else None)
        examples.append(ClassificationExample(text, pair, None, record.source))

    if label_field is None:
        return examples, list(labels) if labels is not None else []
    if labels is None:
        names = discover_labels(value for value in raw_labels if value is not None)
    index = {name: i for i, name in enumerate(names)}
    for example, value in zip(examples, raw_labels):
        example.label = _label_id(value, index, names, example.source, label_field)
    return examples, names


def discover_labels(values: Iterable[str | int]) -> list[str]:
    """Sorted label names: numerically (named str(int)) when every value is an integer, else alphabetically."""
    distinct = {str(value) for value in values}
    if distinct and all(_as_int(value) is not None for value in distinct):
        return [str(number) for number in sorted({_as_int(value) for value in distinct})]
    return sorted(distinct)


def _as_int(value: str | int) -> int | None:
    """An int label, or a string that spells one ("1", "-2"; not "01" or "1.0", which stay names)."""
    if isinstance(value, int):
        return value
    return int(value) if _INTEGER.fullmatch(value.strip()) else None


def _text(record: Record, field: str) -> str:
    value = require(record, field, str)
    if not value.strip():
        raise DataError(f"{record.source}: field '{field}': empty text")
    return value


def _raw_label(record: Record, field: str) -> str | int:
    value = require(record, field, (str, int, float))
    if isinstance(value, float):
        if not value.is_integer():
            raise DataError(f"{record.source}: field '{field}': label {value!r} is not an integer or a name")
        value = int(value)
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DataError(f"{record.source}: field '{field}': empty label")
    return value


def _label_id(value: str | int | None, index: dict[str, int], names: Sequence[str], source: str, field: str) -> int:
    name = str(value)
    if name in index:
        return index[name]
    number = _as_int(value) if value is not None else None
    if number is not None and 0 <= number < len(names) and all(_as_int(n) is None for n in names):
        return number  # an id into a list of names ("1" -> "positive")
    known = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    raise DataError(f"{source}: field '{field}': unknown label {name!r} (known: {known})")


def encode_classification(examples: Sequence[ClassificationExample], tokenizer: Tokenizer,
                          max_length: int) -> EncodedDataset:
    """Token features {"input_ids", "token_type_ids", "labels", "length"}, cut to `max_length` tokens.

    Pairs are truncated longest-first (the longer text loses tokens first). `num_truncated` counts the
    examples that did not fit. "labels" is absent for unlabeled examples.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    texts = [example.text for example in examples]
    has_pairs = any(example.pair is not None for example in examples)
    if has_pairs and any(example.pair is None for example in examples):
        raise DataError(f"{next(e.source for e in examples if e.pair is None)}: some examples have a second text "
                        f"and this one has none")
    pairs = [example.pair for example in examples] if has_pairs else None

    full = tokenizer.encode_batch(texts, pairs)
    too_long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    if too_long:
        cut = tokenizer.encode_batch([texts[i] for i in too_long], [pairs[i] for i in too_long] if pairs else None,
                                     max_length=max_length, truncation=True)
        for row, i in enumerate(too_long):
            full["input_ids"][i] = cut["input_ids"][row]
            full["token_type_ids"][i] = cut["token_type_ids"][row]

    features = []
    for example, ids, types in zip(examples, full["input_ids"], full["token_type_ids"]):
        feature = {"input_ids": ids, "token_type_ids": types, "length": len(ids)}
        if example.label is not None:
            feature["labels"] = example.label
        features.append(feature)
    return EncodedDataset(features, num_examples=len(examples), num_truncated=len(too_long))
