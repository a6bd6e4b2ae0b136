"""Token tagging data (named entities, chunks, semantic roles): CoNLL / jsonl reading, tag schemes, alignment.

Tags are given per word; a model predicts per sub-word token. `encode_tagging` gives the first sub-word of
each word the word's tag and the other sub-words -100 (ignored by the loss), or, with
label_all_subwords=True, the I- version of the tag. Special tokens get -100. Each feature keeps
"word_ids" so that `align_predictions` can read the prediction of each word off its first sub-word.

Tag schemes (`scheme=` of `load_tagging`):
  - "IOB2" (BIO, the default): every entity starts with B-X; I-X must continue a B-X or I-X of the same type.
    An I-X after O or after another type is an error, since it usually means the file is IOB1.
  - "IOB1": I-X may start an entity (B-X only separates two adjacent entities of one type); the tags are
    converted to IOB2, which is what seqeval's default mode and our models expect.
  - "none": tags are opaque labels (POS tags, semantic roles); nothing is checked or converted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.encoded import IGNORE_INDEX, EncodedDataset
from tunelab.data.readers import PathLike, Record, as_paths, read_records, read_text_file, require
from tunelab.errors import DataError

if TYPE_CHECKING:
    from tunelab.tokenizer import Tokenizer

SCHEMES = ("IOB2", "IOB1", "none")
_CONLL_SEPARATOR = re.compile(r"[ \t]+")
_IOB_TAG = re.compile(r"[BI]-.+")


@dataclass
class TaggingExample:
    """A sentence as words, their tags (None for untagged text), and where it is.

    `token_lines` (CoNLL files only) holds the line of every word, for error messages.
    """

    tokens: list[str]
    tags: list[str] | None
    source: str
    token_lines: list[int] | None = field(default=None, repr=False, compare=False)
    # which document the sentence belongs to (its file, and the -DOCSTART- section in CoNLL): the limit of
    # the neighbouring-sentence context of encode_tagging(context_tokens=...)
    document: str = field(default="", repr=False, compare=False)

    def token_source(self, index: int) -> str:
        """Where word `index` is: its own line in a CoNLL file, else the example's source."""
        if self.token_lines is None:
            return self.source
        path = self.source.rsplit(":", 1)[0]
        return f"{path}:{self.token_lines[index]}"


def read_conll(path: PathLike, *, token_column: int = 0, tag_column: int | None = -1) -> list[TaggingExample]:
    """Sentences of a CoNLL file: one word per line with whitespace-separated columns, blank lines between
    sentences, -DOCSTART- lines skipped. tag_column=None reads untagged text. Every line must have as many
    columns as the first one."""
    path = Path(path)
    text = read_text_file(path)
    examples: list[TaggingExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []
    width = width_line = 0
    documents = 0

    def flush() -> None:
        if tokens:
            examples.append(TaggingExample(list(tokens), list(tags) if tag_column is not None else None,
                                           f"{path}:{lines[0]}", list(lines), document=f"{path}#{documents}"))
            tokens.clear()
            tags.clear()
            lines.clear()

    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip(" \t\r")
        if not stripped:
            flush()
            continue
        parts = _CONLL_SEPARATOR.split(stripped)
        if parts[0] == "-DOCSTART-":
            flush()
            documents += 1
            continue
        if not width:
            width, width_line = len(parts), number
            _check_columns(path, number, width, token_column, tag_column)
        elif len(parts) != width:
            raise DataError(f"{path}:{number}: expected {width} columns like line {width_line}, found {len(parts)}")
        tokens.append(parts[token_column])
        if tag_column is not None:
            tags.append(parts[tag_column])
        lines.append(number)
    flush()
    if not examples:
        raise DataError(f"{path}: no sentences (only -DOCSTART- and blank lines)")
    return examples


def _check_columns(path: Path, line: int, width: int, token_column: int, tag_column: int | None) -> None:
    for name, column in (("token_column", token_column), ("tag_column", tag_column)):
        if column is not None and not -width <= column < width:
            raise DataError(f"{path}:{line}: {name}={column} but the line has {width} column(s)")
    if tag_column is not None and token_column % width == tag_column % width:
        raise DataError(f"{path}:{line}: found {width} column(s): a tagged CoNLL file needs a token column and a "
                        f"tag column (tag_column=None reads untagged text)")


def load_tagging(paths: PathLike | Iterable[PathLike], *, format: str = "auto", tokens_field: str = "tokens",
                 tags_field: str | None = "tags", labels: list[str] | None = None, scheme: str = "IOB2",
                 token_column: int = 0, tag_column: int | None = -1) -> tuple[list[TaggingExample], list[str]]:
    """Tagged sentences of CoNLL or record files (jsonl/json/parquet with a list of words and a list of tags)
    and the tag names.

    format "auto" reads .jsonl/.json/.parquet as records and anything else (.txt, .conll, ...) as CoNLL.
    Tags may be names, or ids into `labels`. With `labels` None the names are discovered: "O" first, then
    sorted. Tags are checked (or converted) per `scheme` (see the module docstring). tags_field=None (or
    tag_column=None for CoNLL) reads untagged sentences.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    examples: list[TaggingExample] = []
    for path in as_paths(paths):
        kind = format if format != "auto" else _auto_format(path)
        if kind == "conll":
            examples.extend(read_conll(path, token_column=token_column, tag_column=tag_column))
        else:
            for record in read_records(path, kind):
                examples.append(_record_example(record, tokens_field, tags_field, labels))
    tagged = [example for example in examples if example.tags is not None]
    if scheme != "none":
        for example in tagged:
            example.tags = _to_iob2(example, scheme, tags_field or "tags")
    if labels is None:
        found = {tag for example in tagged for tag in example.tags}
        names = (["O"] if "O" in found or scheme != "none" else []) + sorted(found - {"O"})
    else:
        names = [str(name) for name in labels]
        known = set(names)
        for example in tagged:
            for i, tag in enumerate(example.tags):
                if tag not in known:
                    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                    raise DataError(f"{example.token_source(i)}: field '{tags_field or 'tags'}': unknown tag {tag!r} "
                                    f"of word {i} ({example.tokens[i]!r}) (known: {shown})")
    return examples, names


def _auto_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}.get(suffix, "conll")


def _record_example(record: Record, tokens_field: str, tags_field: str | None,
                    labels: list[str] | None) -> TaggingExample:
    tokens = require(record, tokens_field, list)
    if not tokens:
        raise DataError(f"{record.source}: field '{tokens_field}': no words")
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token.strip():
            raise DataError(f"{record.source}: field '{tokens_field}': word {i} is {token!r}, "
                            f"expected a non-empty string")
    document = record.source.rsplit(":", 1)[0]  # records: the file is the document
    if tags_field is None:
        return TaggingExample(tokens, None, record.source, document=document)
    raw = require(record, tags_field, list)
    if len(raw) != len(tokens):
        raise DataError(f"{record.source}: field '{tags_field}': {len(raw)} tags for {len(tokens)} words")
    tags = []
    for i, tag in enumerate(raw):
        if isinstance(tag, str) and tag:
            tags.append(tag)
        elif isinstance(tag, int) and not isinstance(tag, bool):
            if labels is None:
                raise DataError(f"{record.source}: field '{tags_field}': tag ids like {tag} need the tag names "
                                f"(pass labels=[...])")
            if not 0 <= tag < len(labels):
                raise DataError(f"{record.source}: field '{tags_field}': tag id {tag} of word {i} is not below "
                                f"the {len(labels)} labels")
            tags.append(str(labels[tag]))
        else:
            raise DataError(f"{record.source}: field '{tags_field}': tag {i} is {tag!r}, expected a name or an id")
    return TaggingExample(tokens, tags, record.source, document=document)


def _to_iob2(example: TaggingExample, scheme: str, field_name: str) -> list[str]:
    """The example's tags in IOB2: checked (scheme IOB2) or converted from IOB1."""
    result = []
    previous = "O"
    for i, tag in enumerate(example.tags):
        if tag != "O" and not _IOB_TAG.fullmatch(tag):
            raise DataError(f"{example.token_source(i)}: field '{field_name}': tag {tag!r} of word {i} "
                            f"({example.tokens[i]!r}) is not O, B-<type> or I-<type> (scheme='none' accepts any "
                            f"tags){_column_hint(example, i)}")
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            if scheme == "IOB2":
                raise DataError(
                    f"{example.token_source(i)}: field '{field_name}': {tag} of word {i} ({example.tokens[i]!r}) "
                    f"follows {previous}, which IOB2 does not allow; if the file is IOB1, pass scheme='IOB1' to "
                    f"convert it"
                )
            result.append("B-" + tag[2:])
        else:
            result.append(tag)
        previous = tag
    return result


def _column_hint(example: TaggingExample, index: int) -> str:
    """For a CoNLL file read with the wrong tag column: which columns of the word's line look like tags."""
    if example.token_lines is None:
        return ""
    path, line = example.source.rsplit(":", 1)[0], example.token_lines[index]
    try:
        parts = _CONLL_SEPARATOR.split(Path(path).read_text(encoding="utf-8-sig").split("\n")[line - 1].strip())
    except (OSError, UnicodeDecodeError, IndexError):
        return ""
    columns = [k for k, part in enumerate(parts) if part == "O" or _IOB_TAG.fullmatch(part)]
    return f"; column {columns[0]} looks like the tags: pass tag_column={columns[0]}" if columns else ""


def encode_tagging(examples: Sequence[TaggingExample], tokenizer: Tokenizer, labels: Sequence[str], max_length: int,
                   *, label_all_subwords: bool = False, context_tokens: int = 0) -> EncodedDataset:
    """Sub-word features with word-level tags aligned to tokens.

    Feature keys: "input_ids", "token_type_ids", "labels" (when tagged; per token: the tag id on a word's
    first sub-word, -100 on special tokens and on the other sub-words, or their I- tag id with
    label_all_subwords), "word_ids" (word index per token, None for special tokens), "num_words", "length".
    Sentences longer than `max_length` tokens lose their last words (`num_truncated` counts them); those
    words get no prediction (`align_predictions` fills them in).

    context_tokens > 0 adds up to that many sub-words of the neighbouring sentences (in file order) on each
    side, as document context that the model attends to but is neither trained nor scored on (FLERT,
    Schweter & Akbik 2020: +1 to +2 F1 on CoNLL-2003). Context never crosses a -DOCSTART- line and never
    displaces the sentence's own words.
    """
    ids_of = {name: i for i, name in enumerate(labels)}
    backend = tokenizer.backend
    budget = max_length - backend.num_special_tokens_to_add(False)
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room for words next to the special tokens")
    encodings = backend.encode_batch([example.tokens for example in examples], is_pretokenized=True,
                                     add_special_tokens=False)
    features = []
    truncated = 0
    for index, (example, encoding) in enumerate(zip(examples, encodings)):
        if len(encoding.ids) > budget:
            encoding.truncate(budget)
            truncated += 1
        if context_tokens > 0:
            feature = _with_context(index, examples, encodings, encoding, backend, budget, context_tokens)
        else:
            encoding = backend.post_process(encoding, None, add_special_tokens=True)
            feature = {"input_ids": list(encoding.ids), "token_type_ids": list(encoding.type_ids),
                       "word_ids": list(encoding.word_ids)}
        feature.update(num_words=len(example.tokens), length=len(feature["input_ids"]))
        if example.tags is not None:
            feature["labels"] = _token_labels(example, feature["word_ids"], ids_of, label_all_subwords)
        features.append(feature)
    return EncodedDataset(features, num_examples=len(examples), num_truncated=truncated)


def _with_context(index: int, examples: Sequence[TaggingExample], encodings: list, encoding, backend, budget: int,
                  context_tokens: int) -> dict[str, Any]:
    """The sentence's sub-words between up to `context_tokens` sub-words of its neighbours on each side."""
    from tokenizers import Encoding

    room = budget - len(encoding.ids)
    left_room = min(context_tokens, room - room // 2)
    right_room = min(context_tokens, room - left_room)
    document = examples[index].document

    def gather(step: int, room: int) -> Encoding | None:
        parts, size, i = [], 0, index + step
        while size < room and 0 <= i < len(examples) and examples[i].document == document:
            parts.append(encodings[i])
            size += len(encodings[i].ids)
            i += step
        if not parts or room <= 0:
            return None
        merged = Encoding.merge(parts[::-1] if step < 0 else parts, growing_offsets=False)
        if len(merged.ids) > room:
            merged.truncate(room, direction="left" if step < 0 else "right")
        return merged

    left, right = gather(-1, left_room), gather(+1, right_room)
    n_left = len(left.ids) if left is not None else 0
    pieces = [e for e in (left, encoding, right) if e is not None]
    merged = Encoding.merge(pieces, growing_offsets=False) if len(pieces) > 1 else encoding
    wrapped = backend.post_process(merged, None, add_special_tokens=True)  # [CLS] left sentence right [SEP]
    word_ids: list[int | None] = []
    k = 0  # position among the non-special tokens
    for special in wrapped.special_tokens_mask:
        if special:
            word_ids.append(None)
            continue
        inside = n_left <= k < n_left + len(encoding.ids)
        word_ids.append(encoding.word_ids[k - n_left] if inside else None)
        k += 1
    return {"input_ids": list(wrapped.ids), "token_type_ids": [0] * len(wrapped.ids), "word_ids": word_ids}


def _token_labels(example: TaggingExample, word_ids: list[int | None], ids_of: dict[str, int],
                  label_all_subwords: bool) -> list[int]:
    token_labels = []
    previous_word = None
    for word in word_ids:
        if word is None:
            token_labels.append(IGNORE_INDEX)
        elif word != previous_word:
            token_labels.append(_tag_id(example, word, example.tags[word], ids_of))
        elif label_all_subwords:
            tag = example.tags[word]
            inside = "I-" + tag[2:] if tag.startswith("B-") else tag
            token_labels.append(ids_of[inside] if inside in ids_of else _tag_id(example, word, tag, ids_of))
        else:
            token_labels.append(IGNORE_INDEX)
        previous_word = word
    return token_labels


def _tag_id(example: TaggingExample, word: int, tag: str, ids_of: dict[str, int]) -> int:
    if tag not in ids_of:
        raise DataError(f"{example.token_source(word)}: field 'tags': unknown tag {tag!r} of word {word} "
                        f"(known: {', '.join(list(ids_of)[:20])})")
    return ids_of[tag]


def align_predictions(predictions: Sequence[Any], features: Sequence[dict], labels: Sequence[str], *,
                      fill: str = "O") -> list[list[str]]:
    """Word-level tag names from token-level predictions, one list per feature (for seqeval).

    `predictions[i]` holds the predicted tag ids of feature i's tokens (a list, or a tensor / array row that
    may be right-padded), or its logits [tokens, tags], whose argmax is taken. A word's tag is the prediction
    on its first sub-word; words cut off by truncation get `fill`.
    """
    if len(predictions) != len(features):
        raise ValueError(f"{len(predictions)} prediction rows for {len(features)} features")
    result = []
    for row, feature in zip(predictions, features):
        row = row.tolist() if hasattr(row, "tolist") else list(row)
        if row and isinstance(row[0], (list, tuple)):
            row = [max(range(len(scores)), key=scores.__getitem__) for scores in row]
        word_ids = feature["word_ids"]
        if len(row) < len(word_ids):
            raise ValueError(f"a prediction row has {len(row)} tokens, its feature {len(word_ids)}")
        words: list[str | None] = [None] * feature.get("num_words", 1 + max((w for w in word_ids if w is not None),
                                                                           default=-1))
        for position, word in enumerate(word_ids):
            if word is not None and words[word] is None:
                words[word] = labels[int(row[position])]
        result.append([tag if tag is not None else fill for tag in words])
    return result
