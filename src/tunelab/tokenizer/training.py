"""Train a tokenizer on text files with the `tokenizers` library's trainers, as a tunelab `Tokenizer`.

Four kinds, each a complete pipeline that tunelab and transformers load from the saved tokenizer.json:

- "bpe": byte-pair encoding over characters (Sennrich et al. 2016, "Neural Machine Translation of Rare
  Words with Subword Units"), words marked SentencePiece-style: every space becomes "▁" and starts a word
  (Kudo & Richardson 2018), so spaces and newlines survive a round trip. Characters never seen in
  training become <unk>. Special tokens: <|endoftext|> (eos, pad), <unk>.
- "byte-bpe": GPT-2's byte-level BPE (Radford et al. 2019): the text is split with GPT-2's regular
  expression, each byte is one of 256 base symbols, merges are learned over those. Lossless for any text,
  no unknown token. Special tokens: <|endoftext|> (eos, pad).
- "wordpiece": BERT's WordPiece (Devlin et al. 2019; Schuster & Nakajima 2012): BERT's normalizer (lower
  case and accents stripped by default), split on whitespace and punctuation, "##" marks a word's
  continuation, and BERT's post-processor: [CLS] A [SEP] (and [CLS] A [SEP] B [SEP] with token_type_ids
  0 / 1 for pairs). Special tokens: [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0 to 4).
- "char": one id per character seen in training (nanoGPT's character-level Shakespeare), a lossless
  round trip for text made of those characters. Special tokens: <|endoftext|> (eos, pad), <unk>.

Special tokens get the first ids. The vocabulary size counts them; `char` needs no size (it keeps every
character seen), and the subword kinds learn merges until the vocabulary has `vocab_size` entries (fewer
when the data has no more pairs occurring `min_frequency` times).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE, WordLevel, WordPiece

from tunelab.data.readers import PathLike, as_paths, detect_format, read_records, read_text_file, require
from tunelab.errors import ConfigError, DataError
from tunelab.tokenizer.base import Tokenizer

TOKENIZER_TYPES = ("bpe", "byte-bpe", "wordpiece", "char", "word")

END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<unk>"
# BERT's special tokens, in the order of their ids
BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}


@dataclass
class TrainingSummary:
    """What `train_tokenizer` read and made (for the CLI's report)."""

    files: int
    texts: int
    characters: int
    vocab_size: int
    seconds: float


def special_tokens_of(kind: str) -> dict[str, str]:
    """The named special tokens (eos_token, pad_token, ...) a tokenizer of `kind` is trained with."""
    _check_kind(kind)
    if kind == "wordpiece":
        return dict(BERT_SPECIALS)
    if kind == "byte-bpe":
        return {"eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT}
    if kind == "word":  # WikiText / PTB conventions (tokenizer/word_level.py)
        return {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "<eos>"}
    return {"eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT, "unk_token": UNKNOWN}


def iter_texts(paths: PathLike | Iterable[PathLike], *, format: str = "auto", text_field: str = "text") -> Iterator[str]:
    """The texts of data files: .txt files line by line (each line keeps its newline, so that newlines are
    part of the alphabet), record files (jsonl, json, csv, tsv, parquet) one `text_field` per record."""
    for path in as_paths(paths):
        kind = detect_format(path, format)
        if kind == "txt":
            yield from read_text_file(path).splitlines(keepends=True)
        else:
            for record in read_records(path, kind):
                yield require(record, text_field, str)


def train_tokenizer(
    files: PathLike | Sequence[PathLike],
    *,
    type: str,
    vocab_size: int | None = None,
    out: PathLike | None = None,
    min_frequency: int | None = None,
    lowercase: bool | None = None,
    special_tokens: Sequence[str] = (),
    limit_alphabet: int | None = None,
    model_max_length: int | None = None,
    format: str = "auto",
    text_field: str = "text",
    show_progress: bool = False,
    summary: list | None = None,
) -> Tokenizer:
    """Train a tokenizer of `type` (bpe, byte-bpe, wordpiece, char, word) on the texts of `files`.

    vocab_size: ids in the vocabulary, special tokens included (required except for char and word, where it
    is an upper bound: word keeps the most frequent words). min_frequency: least count of a merge (default 2), or of a character for char (default 1,
    every character). lowercase: lower-case the text first (default: true for wordpiece, as uncased BERT,
    false otherwise). special_tokens: more special tokens to reserve ids for (e.g. chat markers).
    limit_alphabet: bpe / wordpiece keep only this many of the most frequent characters (the rest are
    unknown). `out`: save tokenizer.json, tokenizer_config.json and special_tokens_map.json there.
    `summary`, when a list, receives a TrainingSummary.
    """
    _check_kind(type)
    start = time.perf_counter()
    paths = as_paths(files)
    named = special_tokens_of(type)
    specials = list(dict.fromkeys([*named.values(), *special_tokens]))
    if any(not isinstance(token, str) or not token for token in specials):
        raise ConfigError(f"special tokens must be non-empty strings, got {list(special_tokens)!r}")
    if vocab_size is None and type not in ("char", "word"):
        raise ConfigError(f"a {type} tokenizer needs a vocabulary size (--vocab-size N)")
    if vocab_size is not None and vocab_size <= len(specials):
        raise ConfigError(f"vocabulary size {vocab_size} leaves no room beside the {len(specials)} special tokens "
                          f"({', '.join(specials)})")
    if type == "byte-bpe" and vocab_size < 256 + len(specials):
        raise ConfigError(f"vocabulary size {vocab_size} is too small for byte-level BPE: its alphabet is the 256 "
                          f"bytes, plus {len(specials)} special token(s): use at least {256 + len(specials)}")
    if min_frequency is not None and min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1, got {min_frequency}")
    if limit_alphabet is not None and limit_alphabet < 1:
        raise ConfigError(f"limit_alphabet must be at least 1, got {limit_alphabet}")
    if lowercase is None:
        lowercase = type == "wordpiece"
    min_frequency = min_frequency if min_frequency is not None else (1 if type in ("char", "word") else 2)
    counts = {"texts": 0, "characters": 0}

    def counted() -> Iterator[str]:
        for text in iter_texts(paths, format=format, text_field=text_field):
            counts["texts"] += 1
            counts["characters"] += len(text)
            yield text

    where = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    if type == "word":
        from tunelab.tokenizer.word_level import word_level_from_texts

        tokenizer = word_level_from_texts(counted(), min_frequency=min_frequency, max_vocab=vocab_size,
                                          lowercase=lowercase, special_tokens=[t for t in specials if t not in named.values()])
        if tokenizer.vocab_size <= len(specials):
            raise DataError(f"{where}: no words to train a tokenizer on ({counts['texts']} texts, all of them blank)")
        tokenizer._model_max_length = model_max_length
        return _finish(tokenizer, out, summary, paths, counts, start)

    backend, trainer = _pipeline(type, vocab_size, min_frequency, lowercase, specials, limit_alphabet, show_progress)
    backend.train_from_iterator(counted(), trainer)
    if type == "wordpiece":
        backend = _as_wordpiece(backend, specials)
    learned = backend.get_vocab_size(with_added_tokens=True)
    if learned <= len(specials):
        raise DataError(f"{where}: no text to train a tokenizer on ({counts['texts']} texts, "
                        f"{counts['characters']} characters, all of them blank)")
    if vocab_size is not None and learned > vocab_size:
        base = learned - len(specials)
        what = "characters" if type == "char" else "symbols of the alphabet"
        hint = "" if type in ("char", "byte-bpe") else ", or keep the most frequent characters with limit_alphabet"
        raise ConfigError(f"vocabulary size {vocab_size} is too small for the alphabet of {where}: {base} {what} "
                          f"plus {len(specials)} special tokens need {learned} ids; raise the vocabulary size{hint}")

    extra_config = {"clean_up_tokenization_spaces": False}
    if type == "wordpiece":
        add_bert_post_processor(backend)
        extra_config["do_lower_case"] = lowercase
        # transformers returns token_type_ids (which BERT reads) only for tokenizers that list them
        extra_config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    tokenizer = Tokenizer(backend, special_tokens=named, model_max_length=model_max_length, extra_config=extra_config)
    return _finish(tokenizer, out, summary, paths, counts, start)


def _finish(tokenizer: Tokenizer, out, summary, paths, counts: dict, start: float) -> Tokenizer:
    if out is not None:
        tokenizer.save(out)
    if summary is not None:
        summary.append(TrainingSummary(len(paths), counts["texts"], counts["characters"], tokenizer.vocab_size,
                                       time.perf_counter() - start))
    return tokenizer


def _check_kind(kind: str) -> None:
    if kind not in TOKENIZER_TYPES:
        raise ConfigError(f"unknown tokenizer type {kind!r}; known: {', '.join(TOKENIZER_TYPES)}")


def _pipeline(kind: str, vocab_size: int | None, min_frequency: int, lowercase: bool, specials: list[str],
              limit_alphabet: int | None, show_progress: bool) -> tuple[tokenizers.Tokenizer, object]:
    """An untrained backend (normalizer, pre-tokenizer, model, decoder, post-processor) and its trainer."""
    alphabet = {} if limit_alphabet is None else {"limit_alphabet": limit_alphabet}
    if kind == "char":
        # WordLevel over single characters: the pre-tokenizer isolates every character (an empty pattern
        # matches between each pair), the trainer counts them, Fuse joins them back without separators.
        # It keeps every character (no size limit), so that a too small vocab_size is an error, not a
        # silent loss of characters.
        backend = tokenizers.Tokenizer(WordLevel(unk_token=UNKNOWN))
        backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        backend.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=1 << 30, min_frequency=min_frequency,
                                            special_tokens=specials, show_progress=show_progress)
    elif kind == "byte-bpe":
        backend = tokenizers.Tokenizer(BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    elif kind == "bpe":
        backend = tokenizers.Tokenizer(BPE(unk_token=UNKNOWN))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      show_progress=show_progress, **alphabet)
    else:  # wordpiece: BPE merges over "##"-marked continuations, then a WordPiece model over that vocabulary
        # (what WordPieceTrainer does too, but it numbers the pieces in hash order, a different order in every
        # process: `_as_wordpiece` numbers them the same way every time)
        backend = tokenizers.Tokenizer(BPE(unk_token=BERT_SPECIALS["unk_token"], continuing_subword_prefix="##"))
        backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                        strip_accents=None, lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      continuing_subword_prefix="##", show_progress=show_progress, **alphabet)
    if lowercase and kind != "wordpiece":
        backend.normalizer = normalizers.Lowercase()
    return backend, trainer


def _as_wordpiece(trained: tokenizers.Tokenizer, specials: list[str]) -> tokenizers.Tokenizer:
    """The WordPiece tokenizer over a trained BPE's pieces, numbered reproducibly: the special tokens, then the
    single characters, then their "##" continuations, then the longer pieces by length, each group in code
    point order. (The BPE trainer breaks ties between equally frequent pairs in hash order, which differs
    from one process to the next; WordPiece encodes by longest match, so the order of the ids changes
    nothing but the ids.)"""
    vocab = trained.get_vocab()

    def rank(piece: str) -> tuple:
        if piece in specials:
            return (0, specials.index(piece), "")
        stem = piece[2:] if piece.startswith("##") and len(piece) > 2 else piece
        if len(stem) == 1:
            return (1 if stem == piece else 2, 0, piece)
        return (3, len(stem), piece)

    ordered = {piece: i for i, piece in enumerate(sorted(vocab, key=rank))}
    backend = tokenizers.Tokenizer(WordPiece(ordered, unk_token=BERT_SPECIALS["unk_token"],
                                             continuing_subword_prefix="##", max_input_chars_per_word=100))
    backend.normalizer = trained.normalizer
    backend.pre_tokenizer = trained.pre_tokenizer
    backend.decoder = trained.decoder
    return backend


def add_bert_post_processor(backend: tokenizers.Tokenizer) -> None:
    """[CLS] A [SEP] for one text, [CLS] A [SEP] B [SEP] for a pair (token_type_ids 0, then 1 from B)."""
    cls, sep = BERT_SPECIALS["cls_token"], BERT_SPECIALS["sep_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))],
    )
