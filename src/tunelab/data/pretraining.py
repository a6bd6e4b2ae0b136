"""BERT pretraining data: documents -> sentences -> segment pairs, and masked-LM masking at batch time.

Devlin et al. 2019 (BERT), sec. 3.1 and appendix A: every example is "[CLS] A [SEP] B [SEP]" where segment A
is one or more consecutive sentences of a document and segment B is, half of the time, the sentences that
really follow A (IsNext, label 0) and otherwise a span of another, random document (NotNext, label 1). The
pair fills `max_length` tokens, except for `short_seq_probability` of the examples, which get a random
shorter length (so the model also sees short inputs). Without next-sentence prediction (RoBERTa's
FULL-SENTENCES, Liu et al. 2019) an example is consecutive sentences of one document, "[CLS] ... [SEP]".

Sentences: each line of a document is split after ".", "!" or "?" (and any closing quotes or brackets)
where whitespace follows and the next word starts with an upper-case letter or a digit (optionally
after an opening quote or bracket). A line always ends a sentence. "H. gammarus" stays one sentence;
"U.S. Army" is cut after "U.S." -- a simple rule, stated here so that nobody has to guess it.

Masking (sec. 3.1, "Task #1"): `mask_probability` of the tokens of each row (rounded, at least one) are
chosen as targets; of those, `mask_token_fraction` become [MASK], `random_token_fraction` a random token
of the vocabulary (never a special one) and the rest stay as they are. Special tokens ([CLS], [SEP],
[PAD], [UNK], ...) are never chosen. With whole-word masking whole words are chosen, a WordPiece head
and its "##" pieces together (a word is what the tokenizer's pre-tokenizer calls a word, so this holds for
BPE tokenizers too); words are taken in random order while they fit the row's target count. Masks are
drawn at batch time (dynamic masking, Liu et al. 2019: new masks every epoch), each row's from a generator
seeded by (seed, epoch, row index) alone, so a resumed run draws the same masks and batch size or gradient
accumulation change nothing; validation rows are masked once with a fixed seed, so that every evaluation
scores the same targets.

Masking-rate schedule (optional; Ankner et al. 2023, "Dynamic masking rate schedules for MLM pretraining"):
with `final_probability` the rate moves linearly from `probability` at the start of training to
`final_probability` at the end (the trainer tells the collator its progress, so a resumed run draws the same).
A collator called without a progress masks at the final rate: validation rows are masked as the model
finally trains.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from tunelab.data.collate import pad_collate
from tunelab.data.encoded import IGNORE_INDEX, EncodedDataset
from tunelab.data.readers import PathLike
from tunelab.data.text import WIKITEXT_HEADING, load_text
from tunelab.errors import DataError

if TYPE_CHECKING:
    from tunelab.tokenizer import Tokenizer

IS_NEXT, NOT_NEXT = 0, 1  # next_sentence_label, as BertForPreTraining numbers them

# ------------------------------------------------------------------------------------------- documents

# end of a sentence: . ! or ? with closing quotes/brackets, whitespace, then (after an optional opening quote
# or bracket) the first character of the next word, which must be upper case or a digit (checked in code)
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(\s+)(?=[\"'\u201c\u2018(\[]?(\w))")
# WikiText's tokenized markup: "3 @.@ 1" is 3.1, "M @-@ 82" is M-82, "1 @,@ 000" is 1,000
_WIKITEXT_JOINS = ((" @-@ ", "-"), (" @.@ ", "."), (" @,@ ", ","))


def split_sentences(text: str, *, skip_headings: bool = False) -> list[str]:
    """The sentences of `text` by the rule in the module docstring; with skip_headings, WikiText heading
    lines (" = Title = ", " = = Section = = ") are left out."""
    sentences = []
    for line in text.splitlines():
        if not line.strip() or (skip_headings and WIKITEXT_HEADING.match(line)):
            continue
        start = 0
        for match in _BOUNDARY.finditer(line):
            following = match.group(2)
            if following.isupper() or following.isdigit():
                sentences.append(line[start:match.start(1)].strip())
                start = match.end(1)
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


def undo_wikitext_markup(text: str, unk_token: str | None) -> str:
    """WikiText as plain text: "@-@", "@.@", "@,@" join their neighbours; "<unk>" (a word outside WikiText's
    vocabulary) becomes the tokenizer's unknown token, which is never a masking target."""
    for marked, plain in _WIKITEXT_JOINS:
        text = text.replace(marked, plain)
    if unk_token:
        text = text.replace("<unk>", unk_token)
    return text


def load_documents(paths: PathLike | Iterable[PathLike], *, format: str = "auto", text_field: str = "text",
                   documents: str = "paragraph", unk_token: str | None = None) -> list[list[str]]:
    """Documents as lists of sentences, from .txt files (a document per `documents` rule: "paragraph",
    "line", "file" or "wikitext") or record files (a document per record's `text_field`).

    Documents without any sentence are left out.
    """
    texts = load_text(paths, format=format, text_field=text_field, documents=documents)
    wikitext = documents == "wikitext"
    result = []
    for text in texts:
        if wikitext:
            text = undo_wikitext_markup(text, unk_token)
        sentences = split_sentences(text, skip_headings=wikitext)
        if sentences:
            result.append(sentences)
    return result


# ------------------------------------------------------------------------------------------- examples


@dataclass
class Sentence:
    """Token ids of a sentence and, for each token, 1 if it starts a word (0 for a word's later pieces)."""

    ids: list[int]
    word_starts: list[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PairSettings:
    """How examples are cut: total length with the special tokens, NSP or not, short-example probability."""

    max_length: int = 512
    nsp: bool = True
    short_seq_probability: float = 0.1
    dupe_factor: int = 1
    whole_word: bool = False  # keep "word_starts" in the features for whole-word masking


class PretrainingDataset(EncodedDataset):
    """Pretraining rows; the summary line adds how many documents, sentences and random next segments."""

    num_sentences: int = 0

    def summary(self) -> str:
        text = f"{len(self.features)} rows from {self.num_examples} documents ({self.num_sentences} sentences)"
        labels = [f["next_sentence_label"] for f in self.features if "next_sentence_label" in f]
        if labels:
            text += f", {100 * sum(labels) / len(labels):.1f}% NotNext"
        return text


def encode_sentences(documents: Sequence[Sequence[str]], tokenizer: Tokenizer) -> list[list[Sentence]]:
    """Every sentence tokenized (no special tokens), with the word starts the tokenizer's word ids give."""
    flat = [s for doc in documents for s in doc]
    encodings = tokenizer.backend.encode_batch(flat, add_special_tokens=False) if flat else []
    sentences = iter(encodings)
    result = []
    for doc in documents:
        encoded = []
        for _ in doc:
            e = next(sentences)
            if not e.ids:
                continue
            words = e.word_ids
            starts = [int(i == 0 or w is None or w != words[i - 1]) for i, w in enumerate(words)]
            encoded.append(Sentence(list(e.ids), starts))
        if encoded:
            result.append(encoded)
    return result


def build_examples(documents: Sequence[Sequence[Sentence]], settings: PairSettings, *, cls_id: int, sep_id: int,
                   seed: int) -> list[dict]:
    """Training rows from encoded documents (module docstring), `dupe_factor` passes over them.

    Rows: "input_ids", "token_type_ids" (0 for [CLS] A [SEP], 1 for B [SEP]), "length", with NSP
    "next_sentence_label" (0 IsNext, 1 NotNext), and with whole-word masking "word_starts". With NSP,
    sentences are gathered until they reach the target length, so most pairs are a few tokens too long and
    are trimmed (as BERT's data builder does); without NSP, rows end at sentence boundaries and nothing is cut.
    """
    docs = [d for d in documents if d]
    if settings.nsp and len(docs) < 2:
        raise DataError(f"next-sentence prediction needs at least 2 documents, found {len(docs)}; check "
                        "data.documents (what a document is) or set task.nsp=false")
    budget = settings.max_length - (3 if settings.nsp else 2)
    if budget < 2:
        raise DataError(f"data.max_length {settings.max_length} leaves no room for two segments")
    rng = random.Random(seed)
    rows: list[dict] = []
    for _ in range(settings.dupe_factor):
        for index, doc in enumerate(docs):
            if settings.nsp:
                examples = _pair_examples(docs, index, budget, settings, rng)
            else:
                examples = _packed_examples(doc, budget, settings, rng)
            rows.extend(_feature(a, b, label, cls_id, sep_id, settings.whole_word) for a, b, label in examples)
    return rows


Segment = tuple[list[int], list[int]]  # (ids, word_starts)


def _concat(sentences: Sequence[Sentence]) -> Segment:
    ids, starts = [], []
    for s in sentences:
        ids += s.ids
        starts += s.word_starts
    return ids, starts


def _target_length(budget: int, settings: PairSettings, rng: random.Random) -> int:
    """The full budget, or for short_seq_probability of the examples a random length in [2, budget]."""
    if rng.random() < settings.short_seq_probability:
        return rng.randint(2, budget)
    return budget


def _pair_examples(docs: Sequence[Sequence[Sentence]], index: int, budget: int, settings: PairSettings,
                   rng: random.Random) -> list[tuple[Segment, Segment, int]]:
    """(A, B, label) pairs of document `index`: sentences gathered up to a target length, cut into A and B."""
    doc = docs[index]
    out = []
    target = _target_length(budget, settings, rng)
    chunk: list[Sentence] = []
    size, i = 0, 0
    while i < len(doc):
        chunk.append(doc[i])
        size += len(doc[i])
        if i == len(doc) - 1 or size >= target:
            is_next = rng.random() < 0.5
            if is_next and len(chunk) == 1 and i + 1 < len(doc):
                i += 1  # A is this one sentence: its true continuation is the next one
                chunk.append(doc[i])
            if len(chunk) == 1:
                is_next = False  # the last sentence of a document has no continuation
            a_count = rng.randint(1, len(chunk) - 1) if len(chunk) > 1 else 1
            a = _concat(chunk[:a_count])
            if is_next:
                b = _concat(chunk[a_count:])
            else:
                b = _random_span(docs, index, max(1, target - len(a[0])), rng)
                i -= len(chunk) - a_count  # the sentences not used for A start the next example
            a, b = _truncate_pair(a, b, budget, rng)
            out.append((a, b, IS_NEXT if is_next else NOT_NEXT))
            chunk, size = [], 0
            target = _target_length(budget, settings, rng)
        i += 1
    return out


def _random_span(docs: Sequence[Sequence[Sentence]], exclude: int, length: int, rng: random.Random) -> Segment:
    """Consecutive sentences of a random other document, from a random sentence on, until `length` tokens."""
    other = rng.randrange(len(docs) - 1)
    other += other >= exclude  # any document but `exclude`
    doc = docs[other]
    start = rng.randrange(len(doc))
    ids, starts = [], []
    for sentence in doc[start:]:
        ids += sentence.ids
        starts += sentence.word_starts
        if len(ids) >= length:
            break
    return ids, starts


def _truncate_pair(a: Segment, b: Segment, budget: int, rng: random.Random) -> tuple[Segment, Segment]:
    """Trim the longer segment one token at a time, from its front or back at random, until both fit."""
    (a_ids, a_starts), (b_ids, b_starts) = (list(a[0]), list(a[1])), (list(b[0]), list(b[1]))
    while len(a_ids) + len(b_ids) > budget:
        ids, starts = (a_ids, a_starts) if len(a_ids) > len(b_ids) else (b_ids, b_starts)
        if rng.random() < 0.5:
            del ids[0], starts[0]
        else:
            ids.pop()
            starts.pop()
    return (a_ids, a_starts), (b_ids, b_starts)


def _packed_examples(doc: Sequence[Sentence], budget: int, settings: PairSettings,
                     rng: random.Random) -> list[tuple[Segment, None, None]]:
    """Consecutive sentences packed up to a target length (a sentence longer than the budget is cut into pieces)."""
    pieces: list[Sentence] = []
    for s in doc:
        for start in range(0, len(s), budget):
            pieces.append(Sentence(s.ids[start:start + budget], s.word_starts[start:start + budget]))
    out = []
    target = _target_length(budget, settings, rng)
    chunk: list[Sentence] = []
    size = 0
    for piece in pieces:
        if chunk and size + len(piece) > target:
            out.append((_concat(chunk), None, None))
            chunk, size = [], 0
            target = _target_length(budget, settings, rng)
        chunk.append(piece)
        size += len(piece)
    if chunk:
        out.append((_concat(chunk), None, None))
    return out


def _feature(a: Segment, b: Segment | None, label: int | None, cls_id: int, sep_id: int, whole_word: bool) -> dict:
    """[CLS] A [SEP] (B [SEP]) with token types 0 for the first part and 1 for B [SEP]."""
    ids = [cls_id, *a[0], sep_id]
    starts = [1, 1, *a[1][1:], 1]  # a segment's first token starts a word even if truncation cut its head
    types = [0] * len(ids)
    if b is not None:
        ids += [*b[0], sep_id]
        starts += [1, *b[1][1:], 1]
        types += [1] * (len(b[0]) + 1)
    feature = {"input_ids": ids, "token_type_ids": types, "length": len(ids)}
    if label is not None:
        feature["next_sentence_label"] = label
    if whole_word:
        feature["word_starts"] = starts
    return feature


def encode_pretraining(documents: Sequence[Sequence[str]], tokenizer: Tokenizer, settings: PairSettings, *,
                       seed: int) -> PretrainingDataset:
    """Documents (lists of sentences) -> pretraining rows, built once with `seed` (see `build_examples`)."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None or tokenizer.mask_token_id is None:
        raise DataError("masked-LM pretraining needs a tokenizer with CLS, SEP and MASK tokens (e.g. a BERT "
                        f"WordPiece tokenizer); this one has {tokenizer.special_tokens}")
    encoded = encode_sentences(documents, tokenizer)
    rows = build_examples(encoded, settings, cls_id=cls_id, sep_id=sep_id, seed=seed)
    for index, row in enumerate(rows):
        row["row"] = index  # what masking_generator seeds each row's masks with
    dataset = PretrainingDataset(rows, num_examples=len(encoded))
    dataset.num_sentences = sum(len(d) for d in encoded)
    return dataset


# -------------------------------------------------------------------------------------------- masking


@dataclass(frozen=True)
class MaskingSettings:
    """BERT's masking: 15% of the tokens are targets; of those 80% [MASK], 10% random, 10% unchanged.
    With final_probability the share of targets moves linearly from probability to it over training."""

    probability: float = 0.15
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    whole_word: bool = False
    final_probability: float | None = None

    def at(self, progress: float) -> MaskingSettings:
        """The settings at `progress` (0: first step, 1: end of training): a constant rate without
        final_probability, else the linear interpolation from probability to final_probability."""
        if self.final_probability is None:
            return self
        p = min(max(progress, 0.0), 1.0)
        return replace(self, probability=(1.0 - p) * self.probability + p * self.final_probability,
                       final_probability=None)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al. 2014): a well-mixed 64-bit value from any 64-bit input."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def masking_generator(seed: int, stream: int, epoch: int, row: int) -> torch.Generator:
    """The generator of one row's masks: a function of (seed, stream, epoch, row index) only; stream 0 trains,
    1 validates. Masks therefore change every epoch, and do not depend on batch size, accumulation, padding,
    the order of batches or a resume."""
    state = 0
    for value in (seed, stream, epoch, row):
        state = _splitmix64(state ^ (value & _MASK64))
    return torch.Generator().manual_seed(state >> 1)


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, *, settings: MaskingSettings, mask_token_id: int,
                replacement_ids: torch.Tensor, generators: Sequence[torch.Generator], lengths: Sequence[int],
                word_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input_ids [B, T], labels [B, T]: the original id at targets, -100 elsewhere).

    maskable [B, T]: tokens that may be chosen (not special, not padding). generators: one per row, which
    draws the row's random numbers for its `lengths[b]` tokens (so padding changes nothing). word_starts
    [B, T] (whole-word masking): 1 where a word starts. settings.probability is the rate (a schedule is
    resolved before: MaskingSettings.at). Each row gets round(probability * maskable tokens)
    targets (at least one): every word (or token) draws a random key, and words are taken in key order while
    the row's count of targets stays within that number.
    """
    B, T = input_ids.shape
    key_noise = torch.full((B, T), 2.0)  # per word: its place in the random order (padding: last)
    draw = torch.ones(B, T)  # per target: [MASK], random token or unchanged
    pick = torch.zeros(B, T, dtype=torch.long)  # per target: which random token
    for b, (generator, n) in enumerate(zip(generators, lengths)):
        key_noise[b, :n] = torch.rand(n, generator=generator)
        draw[b, :n] = torch.rand(n, generator=generator)
        pick[b, :n] = torch.randint(len(replacement_ids), (n,), generator=generator)

    if word_starts is None:
        word = torch.arange(T).expand(B, T)  # every token is its own word
    else:
        starts = word_starts.bool() | ~maskable  # special tokens and padding end a word
        starts[:, 0] = True
        word = starts.long().cumsum(dim=1) - 1  # [B, T] word index of each token
    available = maskable.sum(dim=1)  # [B]
    quota = torch.round(available.float() * settings.probability).long()
    quota = torch.where(available > 0, quota.clamp(min=1), quota)  # [B]

    key = key_noise.gather(1, word).masked_fill(~maskable, 2.0)  # a word's tokens share its key
    _, order = torch.sort(key, dim=1, stable=True)  # words in key order, each word's tokens together
    taken = maskable.gather(1, order).long().cumsum(dim=1)  # [B, T] targets so far, in that order
    word_sorted = word.gather(1, order)
    # a word is chosen when the count after its last token is within the quota
    word_end = torch.zeros(B, T, dtype=torch.long).scatter_reduce(1, word_sorted, taken, reduce="amax",
                                                                  include_self=False)
    chosen_sorted = (word_end.gather(1, word_sorted) <= quota[:, None]) & maskable.gather(1, order)
    chosen = torch.zeros_like(maskable).scatter(1, order, chosen_sorted)  # [B, T] bool

    to_mask = chosen & (draw < settings.mask_token_fraction)
    to_random = chosen & ~to_mask & (draw < settings.mask_token_fraction + settings.random_token_fraction)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, replacement_ids[pick], masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


class MaskedLMCollator:
    """Pads a batch of pretraining rows and masks it: collator(rows, epoch, progress) -> batch.

    The batch has input_ids (masked), attention_mask, token_type_ids, labels (-100 except at targets) and,
    with NSP, next_sentence_label. Each row's masks come from masking_generator(seed, stream, epoch, row),
    where row is the row's "row" index (set when the rows are built). `progress` (0 to 1, default the end)
    places the batch in training for a masking-rate schedule (MaskingSettings.final_probability).
    """

    def __init__(self, *, pad_token_id: int, mask_token_id: int, special_ids: Iterable[int], vocab_size: int,
                 settings: MaskingSettings, seed: int, stream: int = 0) -> None:
        self.pad_token_id = pad_token_id
        self.mask_token_id = mask_token_id
        self.special_ids = torch.tensor(sorted(set(special_ids) | {pad_token_id, mask_token_id}), dtype=torch.long)
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[self.special_ids[self.special_ids < vocab_size]] = False
        self.replacement_ids = torch.arange(vocab_size)[keep]  # random replacements: any non-special token
        self.settings = settings
        self.seed = seed
        self.stream = stream

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, settings: MaskingSettings, *, seed: int, stream: int = 0,
                      vocab_size: int | None = None) -> MaskedLMCollator:
        if tokenizer.mask_token_id is None:
            raise DataError("masked-LM pretraining needs a tokenizer with a mask token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(pad_token_id=pad, mask_token_id=tokenizer.mask_token_id, special_ids=tokenizer.all_special_ids,
                   vocab_size=vocab_size or tokenizer.vocab_size, settings=settings, seed=seed, stream=stream)

    def __call__(self, rows: Sequence[dict], epoch: int = 0, progress: float = 1.0) -> dict[str, torch.Tensor]:
        batch = pad_collate(rows, pad_token_id=self.pad_token_id)
        ids = batch["input_ids"]
        maskable = batch["attention_mask"].bool() & ~torch.isin(ids, self.special_ids)
        word_starts = None
        if self.settings.whole_word:
            if "word_starts" not in rows[0]:
                raise DataError("whole-word masking needs rows built with whole_word=True (they have no word_starts)")
            width = ids.shape[1]
            word_starts = torch.tensor([list(r["word_starts"]) + [1] * (width - len(r["word_starts"])) for r in rows])
        if "row" not in rows[0]:
            raise DataError("pretraining rows need their 'row' index (build them with encode_pretraining)")
        generators = [masking_generator(self.seed, self.stream, epoch, r["row"]) for r in rows]
        batch["input_ids"], batch["labels"] = mask_tokens(
            ids, maskable, settings=self.settings.at(progress), mask_token_id=self.mask_token_id,
            replacement_ids=self.replacement_ids, generators=generators, lengths=[len(r["input_ids"]) for r in rows],
            word_starts=word_starts)
        return batch


def mask_features(features: Sequence[dict], collator: MaskedLMCollator, *, chunk: int = 256) -> list[dict]:
    """Rows masked once (validation): each gets masked "input_ids" and "labels", drawn for epoch 0 of the
    collator's seed and stream at its final masking rate, so every evaluation scores the same targets."""
    out = []
    for start in range(0, len(features), chunk):
        rows = features[start:start + chunk]
        batch = collator(rows, 0)
        for row, ids, labels in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist()):
            n = len(row["input_ids"])
            masked = {k: v for k, v in row.items() if k != "word_starts"}
            masked["input_ids"], masked["labels"] = ids[:n], labels[:n]
            out.append(masked)
    return out
