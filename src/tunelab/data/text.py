"""Plain text for causal language modelling: documents from files, tokenized and packed into rows.

Packing (as in GPT-style pretraining) concatenates the tokenized documents, each followed by EOS, and cuts
the stream into rows of exactly `max_length` tokens, so no compute is spent on padding. Each row carries
"document_ids" (which document of the row each token belongs to, counting from 0 in every row) and
"position_ids" that restart at 0 where a document (or the row) starts, so that a model can confine
attention to each document and give every document the positions it would have alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tunelab.data.encoded import IGNORE_INDEX, EncodedDataset
from tunelab.data.readers import PathLike, as_paths, detect_format, read_records, read_text_file, require
from tunelab.errors import DataError

if TYPE_CHECKING:
    from tunelab.tokenizer import Tokenizer

DOCUMENT_MODES = ("file", "paragraph", "line", "wikitext")
# WikiText (Merity et al. 2016): " = Title = " starts an article, " = = Section = = " and deeper are headings inside it
WIKITEXT_TITLE = re.compile(r"^ ?= [^=].* = ?$")
WIKITEXT_HEADING = re.compile(r"^ ?(= )+[^=].*( =)+ ?$")


def load_text(paths: PathLike | Iterable[PathLike], *, format: str = "auto", text_field: str = "text",
              documents: str = "file") -> list[str]:
    """Documents of text files (.txt) or of record files (one document per record's `text_field`).

    For .txt files `documents` chooses what a document is: "file" (the whole file, the usual choice for a
    corpus such as tinyshakespeare), "paragraph" (blocks separated by blank lines), "line" (each
    non-empty line) or "wikitext" (a WikiText article: from one " = Title = " line to the next, blank lines
    dropped). Blank documents are left out.
    """
    if documents not in DOCUMENT_MODES:
        raise ValueError(f"documents must be one of {', '.join(DOCUMENT_MODES)}, got {documents!r}")
    result: list[str] = []
    for path in as_paths(paths):
        kind = detect_format(path, format)
        if kind != "txt":
            for record in read_records(path, kind):
                text = require(record, text_field, str)
                if text.strip():
                    result.append(text)
            continue
        text = read_text_file(path)
        if documents == "file":
            result.append(text)
        elif documents == "line":
            result.extend(line.rstrip("\r") for line in text.split("\n") if line.strip())
        elif documents == "wikitext":
            result.extend(_wikitext_articles(text))
        else:
            result.extend(_paragraphs(text))
    return result


def _paragraphs(text: str) -> list[str]:
    """Blocks of non-blank lines (a line of only whitespace separates paragraphs), joined by newlines."""
    paragraphs, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line.rstrip("\r"))
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _wikitext_articles(text: str) -> list[str]:
    """WikiText articles: each starts at a top-level " = Title = " line; their non-blank lines joined by newlines."""
    articles: list[list[str]] = []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if WIKITEXT_TITLE.match(line) or not articles:
            articles.append([])
        if line.strip():
            articles[-1].append(line)
    return ["\n".join(lines) for lines in articles if lines]


def encode_causal_lm(documents: Sequence[str], tokenizer: Tokenizer, max_length: int, *, packing: bool = True,
                     add_eos: bool = True, add_special_tokens: bool = True, drop_last: bool = False,
                     random_offsets: bool = False, seed: int = 0) -> EncodedDataset:
    """Rows for next-token prediction: "input_ids", "labels" (= input ids, -100 where nothing is to be
    predicted; the shift happens in the loss), "length", and with packing "position_ids", "document_ids".

    packing=True: documents (each + EOS when add_eos) are concatenated and cut into rows of exactly
    `max_length` tokens; the last row holds the remainder (shorter) unless drop_last. A document that starts
    inside a row gets label -100 on its first token, which would otherwise be predicted from the previous
    document. packing=False: one row per document, cut to `max_length` (num_truncated counts those).
    add_special_tokens adds the tokenizer's own BOS/EOS framing (e.g. Llama's <s>) to every document.
    random_offsets (with packing): the rows are ShiftingWindows, cut at a new offset every epoch.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 for next-token prediction, got {max_length}")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise DataError("the tokenizer has no EOS token to end documents with; pass add_eos=False")
    texts = [document for document in documents if document.strip()]
    encoded = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else []
    token_lists = []
    for ids in encoded:
        if add_eos and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        if ids:
            token_lists.append(ids)
    dataset = EncodedDataset([], num_examples=len(texts))
    if not packing:
        for ids in token_lists:
            if len(ids) > max_length:
                ids = ids[:max_length]
                dataset.num_truncated += 1
            dataset.features.append({"input_ids": ids, "labels": list(ids), "length": len(ids)})
        return dataset
    if random_offsets:
        dataset.features = ShiftingWindows(token_lists, max_length, seed=seed)
    else:
        dataset.features = pack_documents(token_lists, max_length, drop_last=drop_last)
    return dataset


def pack_documents(token_lists: Iterable[list[int]], max_length: int, *, drop_last: bool = False) -> list[dict]:
    """Concatenate token lists into rows of `max_length` tokens with position_ids and document_ids (see
    `encode_causal_lm`); a document longer than the room left in a row continues in the next row."""
    rows: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    document_ids: list[int] = []

    def flush() -> None:
        rows.append({"input_ids": ids.copy(), "labels": labels.copy(), "position_ids": positions.copy(),
                     "document_ids": document_ids.copy(), "length": len(ids)})
        for row_list in (ids, labels, positions, document_ids):
            row_list.clear()

    for tokens in token_lists:
        offset = 0
        while offset < len(tokens):
            piece = tokens[offset:offset + max_length - len(ids)]
            document = document_ids[-1] + 1 if document_ids else 0
            starts_inside_row = offset == 0 and bool(ids)
            ids.extend(piece)
            labels.extend(piece)
            if starts_inside_row:
                labels[-len(piece)] = IGNORE_INDEX  # predicted from the previous document: no target
            positions.extend(range(len(piece)))
            document_ids.extend([document] * len(piece))
            offset += len(piece)
            if len(ids) == max_length:
                flush()
    if ids and not drop_last:
        flush()
    return rows


class ShiftingWindows(Sequence):
    """Training rows of packed documents, cut at an offset that changes every epoch.

    Fixed rows show a model the same windows in every epoch: the same token always sits at position 0 and
    the same context always precedes each token. Cutting the token stream at a new random offset each epoch
    (nanoGPT samples windows at random places for the same reason) shows new windows at no extra cost.
    Every row has exactly `max_length` tokens, with the "document_ids", "position_ids" and "labels" that
    `pack_documents` gives (at offset 0 the rows are pack_documents' full rows); the count of rows is the
    same in every epoch: the stream's last partial window is left out. `set_epoch(e)` picks the offset of
    epoch e from the seed (epoch 0: offset 0), so a resumed run sees the same rows.
    """

    def __init__(self, token_lists: Iterable[list[int]], max_length: int, *, seed: int = 0) -> None:
        import numpy as np

        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        lists = [list(tokens) for tokens in token_lists if tokens]
        self.max_length, self.seed = max_length, seed
        self._ids = np.fromiter((t for tokens in lists for t in tokens), dtype=np.int64)
        self._starts = np.zeros(len(self._ids), dtype=bool)  # True at the first token of each document
        self._starts[np.cumsum([0] + [len(tokens) for tokens in lists[:-1]], dtype=np.int64)] = bool(lists)
        count = max(0, (len(self._ids) - max_length + 1) // max_length)
        if count == 0 and len(self._ids) >= max_length:
            count = 1
        self._count = count
        self.offset = 0

    def truncate(self, max_rows: int | None) -> None:
        """Keep at most `max_rows` rows per epoch (data.max_train_examples)."""
        if max_rows is not None:
            self._count = min(self._count, max_rows)

    @classmethod
    def from_rows(cls, rows: Sequence[dict], max_length: int, **kwargs) -> "ShiftingWindows":
        """Windows over the stream of consecutive packed rows of ONE document (a single corpus file)."""
        return cls([[token for row in rows for token in row["input_ids"]]], max_length, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        import random

        slack = len(self._ids) - self._count * self.max_length  # room to shift without losing a row
        self.offset = 0 if epoch == 0 or slack <= 0 else random.Random(self.seed * 1_000_003 + epoch).randrange(
            min(slack, self.max_length - 1) + 1)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        import numpy as np

        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        index %= len(self)
        start = self.offset + index * self.max_length
        ids = self._ids[start:start + self.max_length]
        starts = self._starts[start:start + self.max_length].copy()
        labels = ids.copy()
        labels[starts] = IGNORE_INDEX  # a document that starts inside the row is not predicted from the one before
        labels[0] = ids[0]
        starts[0] = True  # the row's first token starts its piece of a document
        steps = np.arange(len(ids))
        positions = steps - np.maximum.accumulate(np.where(starts, steps, 0))
        return {"input_ids": ids.tolist(), "labels": labels.tolist(), "position_ids": positions.tolist(),
                "document_ids": (np.cumsum(starts) - 1).tolist(), "length": len(ids)}
