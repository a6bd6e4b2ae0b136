"""The examples a model answers when feedback is collected: read from data files, or given by the caller.

An `Example` is what the model is given (`input`: a text, or chat messages), its gold answer when the data has
one (`reference`: a label name, a list of tags, a reference text), where it comes from (`where`: "file:line"),
and the data row itself (`fields`, what a verifier sees). Each task reads its files with the training
readers, so the formats, field options and error messages are the same as in `tunelab train`:

- classification: text (and `text_pair`) and the label, under data.text_field / label_field;
- tagging: words (`tokens`) and their tags; CoNLL or records;
- chat: alpaca, sharegpt or OpenAI-messages records; the prompt is the conversation up to its last user turn,
  the reference its final assistant message, else a `reference` or `answer` field of the record; with
  data.instruction, source/target pairs as in training;
- seq2seq: source and target (two parallel files, or records).

Labels are read when the file has them (or when the gold judge needs them, which makes a missing one an
error that names the file and line).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.schema import DataSection
from tunelab.data.readers import read_records
from tunelab.errors import DataError, FeedbackError

COLLECT_TASKS = ("classification", "tagging", "chat", "seq2seq")
CHAT_FORMATS = ("alpaca", "sharegpt", "messages")
# record fields a chat example's reference is read from when the conversation has no final answer
REFERENCE_FIELDS = ("reference", "answer")


@dataclass
class Example:
    """One input to judge the model's answer to, its gold answer (None if unknown), and where it is from."""

    input: str | list[dict[str, str]]
    reference: Any = None
    where: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    text_pair: str | None = None  # classification of text pairs: the second text
    tokens: list[str] | None = None  # tagging: the words (input is them joined by spaces)

    @property
    def key(self) -> str:
        """A fingerprint of what the model is given: the same input gives the same key in any file or order,
        which is how a later collection knows that an output was judged already."""
        text = json.dumps([self.input, self.text_pair, self.tokens], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    @property
    def prompt_text(self) -> str:
        """The input as one text: the last user message of a conversation, the text itself otherwise."""
        if isinstance(self.input, str):
            return self.input
        users = [m["content"] for m in self.input if m["role"] == "user"]
        return users[-1] if users else self.input[-1]["content"]

    @property
    def messages(self) -> list[dict[str, str]]:
        """The input as chat messages (a text is one user message)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [dict(m) for m in self.input]

    def verifier_fields(self) -> dict[str, Any]:
        """What a verifier is given as `example`: the data row, plus `prompt`, `input` and `reference` when the
        row has no field of that name."""
        fields = dict(self.fields)
        fields.setdefault("prompt", self.prompt_text)
        fields.setdefault("input", self.input)
        if self.reference is not None:
            fields.setdefault("reference", self.reference)
        return fields

    def location(self) -> dict[str, Any]:
        """The data file and line (or index in a JSON array / parquet file) for a record's metadata."""
        path, sep, place = self.where.rpartition(":")
        if not sep:
            return {}  # not from a file ("example 3": the caller's list)
        if place.isdigit():
            return {"data": path, "line": int(place)}
        if place.startswith("#") and place[1:].isdigit():
            return {"data": path, "index": int(place[1:])}
        return {"data": self.where}


def as_examples(items: Iterable[Example | Mapping[str, Any]]) -> list[Example]:
    """Examples from Example objects or mappings with an `input` (and optionally `reference`, `text_pair`,
    `tokens`, `where`; other keys become the fields a verifier sees)."""
    examples = []
    for i, item in enumerate(items):
        if isinstance(item, Example):
            examples.append(item)
            continue
        if not isinstance(item, Mapping):
            raise FeedbackError(f"example {i}: expected an Example or a mapping with 'input', found "
                                f"{type(item).__name__}")
        if "input" not in item:
            raise FeedbackError(f"example {i}: missing field 'input' (fields: {', '.join(map(repr, item)) or 'none'})")
        value = item["input"]
        if not (isinstance(value, str) and value.strip()) and not _is_messages(value):
            raise FeedbackError(f"example {i}: field 'input': expected a non-empty text or a list of chat messages")
        known = ("input", "reference", "text_pair", "tokens", "where")
        examples.append(Example(value, item.get("reference"), str(item.get("where") or f"example {i}"),
                                {k: v for k, v in item.items() if k not in known}, item.get("text_pair"),
                                list(item["tokens"]) if item.get("tokens") is not None else None))
    return examples


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def read_examples(paths: str | Path | Sequence[str | Path], task: str, *, data: DataSection | None = None,
                  labels: Sequence[str] | None = None, need_reference: bool = False,
                  limit: int | None = None) -> list[Example]:
    """The examples of data files for `task` (classification, tagging, chat, seq2seq), read with the field
    options of `data` (a config's data section; defaults otherwise) and, for labelled tasks, the model's
    `labels`. `need_reference`: every example must have its gold answer (DataError naming file and line)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise DataError("no data files given")
    data = data or DataSection(train=[str(p) for p in paths])
    readers = {"classification": _classification, "tagging": _tagging, "chat": _chat, "seq2seq": _seq2seq}
    if task not in readers:
        raise FeedbackError(f"collecting feedback works on the outputs of {', '.join(COLLECT_TASKS)} models, "
                            f"not {task}")
    examples = readers[task]([Path(p) for p in paths], data, list(labels) if labels else None, need_reference)
    if not examples:
        raise DataError(f"{', '.join(map(str, paths))}: no examples")
    return examples[:limit] if limit is not None else examples


def _rows_by_source(paths: list[Path], file_format: str) -> dict[str, dict[str, Any]]:
    """Every record of record files by its source ("file:line"): the fields a verifier sees."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        rows.update((record.source, record.data) for record in read_records(path, file_format))
    return rows


def _classification(paths: list[Path], d: DataSection, labels, need_reference: bool) -> list[Example]:
    from tunelab.data.classification import load_classification

    rows = _rows_by_source(paths, d.format)
    labelled = need_reference or all(d.label_field in row and row[d.label_field] is not None for row in rows.values())
    items, names = load_classification(paths, format=d.format, text_field=d.text_field, pair_field=d.text_pair_field,
                                       label_field=d.label_field if labelled else None, labels=labels)
    return [Example(e.text, names[e.label] if e.label is not None else None, e.source, rows.get(e.source, {}),
                    text_pair=e.pair) for e in items]


def _tagging(paths: list[Path], d: DataSection, labels, need_reference: bool) -> list[Example]:
    from tunelab.data.tagging import load_tagging

    fmt = "auto" if d.format == "conll" else d.format
    kinds = [fmt if fmt != "auto" else _RECORD_SUFFIXES.get(p.suffix.lower(), "conll") for p in paths]
    rows: dict[str, dict[str, Any]] = {}
    for path, kind in zip(paths, kinds):
        if kind != "conll":
            rows.update(_rows_by_source([path], kind))
    tagged = need_reference or (all(d.tags_field in row for row in rows.values()) and
                                all(_conll_has_tags(p) for p, kind in zip(paths, kinds) if kind == "conll"))
    items, _ = load_tagging(paths, format=fmt, tokens_field=d.tokens_field, tags_field=d.tags_field if tagged else None,
                            labels=labels if tagged else None, token_column=d.token_column,
                            tag_column=d.tag_column if tagged else None)
    return [Example(" ".join(e.tokens), list(e.tags) if e.tags is not None else None, e.source,
                    rows.get(e.source) or {"tokens": list(e.tokens), **({"tags": list(e.tags)} if e.tags else {})},
                    tokens=list(e.tokens)) for e in items]


# how load_tagging tells record files from CoNLL ones (format auto): by the extension
_RECORD_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


def _conll_has_tags(path: Path) -> bool:
    """Whether a CoNLL file has a tag column besides the words (its first word line decides)."""
    from tunelab.data.readers import read_text_file

    for line in read_text_file(path).split("\n"):
        parts = line.split()
        if parts and parts[0] != "-DOCSTART-":
            return len(parts) > 1
    return False


def _chat(paths: list[Path], d: DataSection, labels, need_reference: bool) -> list[Example]:
    if d.instruction is not None:
        from tunelab.data.seq2seq import instruction_prompt, load_pairs

        pairs = load_pairs(paths, format=d.format, source_field=d.source_field, target_field=d.target_field,
                           require_target=need_reference)
        rows = {} if d.format == "parallel" else _rows_by_source(paths, d.format)
        return [Example([{"role": "user", "content": instruction_prompt(d.instruction, p.source)}], p.target, p.where,
                        rows.get(p.where) or {"source": p.source, **({"target": p.target} if p.target else {})})
                for p in pairs]
    from tunelab.data.chat import load_chat

    chat_format = d.format if d.format in CHAT_FORMATS else "auto"
    file_format = d.format if chat_format == "auto" else "auto"
    rows = _rows_by_source(paths, file_format)
    examples = []
    for conversation in load_chat(paths, format=chat_format, file_format=file_format, final_assistant=False):
        messages, row = conversation.messages, rows.get(conversation.source, {})
        reference = None
        if messages[-1]["role"] == "assistant":
            reference, messages = messages[-1]["content"], messages[:-1]
        else:
            found = next((row[name] for name in REFERENCE_FIELDS if row.get(name) is not None), None)
            reference = found if found is None or isinstance(found, str) else json.dumps(found, ensure_ascii=False)
        if reference is None and need_reference:
            raise DataError(f"{conversation.source}: the gold judge needs a reference answer: the conversation's "
                            f"final assistant message, or a field {' or '.join(map(repr, REFERENCE_FIELDS))}")
        examples.append(Example(messages, reference, conversation.source, row))
    return examples


def _seq2seq(paths: list[Path], d: DataSection, labels, need_reference: bool) -> list[Example]:
    from tunelab.data.seq2seq import load_pairs

    pairs = load_pairs(paths, format=d.format, source_field=d.source_field, target_field=d.target_field,
                       require_target=need_reference)
    rows = {} if d.format == "parallel" else _rows_by_source(paths, d.format)
    return [Example(p.source, p.target, p.where,
                    rows.get(p.where) or {"source": p.source, **({"target": p.target} if p.target else {})})
            for p in pairs]
