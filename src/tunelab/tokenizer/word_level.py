"""Word-level tokenizers for corpora that come tokenized into words, such as WikiText (Merity et al. 2017).

Words are the whitespace-separated pieces of the text; a line end is the word `<eos>` (as in the standard
WikiText and Penn Treebank language-model set-ups, where every line, blank lines included, ends with
<eos>); words outside the vocabulary become `<unk>` (WikiText already uses <unk> for its rare words).
The vocabulary is the training files' words (those seen at least `min_frequency` times), most frequent
first, after the special tokens <pad> (id 0, for padded batches), <unk> and <eos>.

    tokenizer = train_word_level(["../shared/data/wikitext2/valid.txt"])
    tokenizer.save("runs/wikitext2-words")           # tokenizer.json & co: model.tokenizer of a config

The CLI: `tunelab tokenizer train --type word --data FILES --out DIR` (tokenizer/training.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import WordLevel

from tunelab.errors import TokenizerError
from tunelab.tokenizer.base import Tokenizer


def word_level_backend(vocab: dict[str, int], *, unk_token: str = "<unk>", eos_token: str | None = "<eos>",
                       lowercase: bool = False) -> Backend:
    """The pipeline: (lower-case), line end -> " <eos> ", split on whitespace, look each word up."""
    backend = Backend(WordLevel(vocab, unk_token=unk_token))
    steps = [normalizers.Lowercase()] if lowercase else []
    if eos_token is not None:
        steps.append(normalizers.Replace(Regex(r"\r?\n"), f" {eos_token} "))
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return backend


def train_word_level(files: Iterable[str | Path], *, min_frequency: int = 1, max_vocab: int | None = None,
                     lowercase: bool = False, unk_token: str = "<unk>", eos_token: str = "<eos>",
                     pad_token: str = "<pad>") -> Tokenizer:
    """A word-level Tokenizer over the words of `files` (text files, read as UTF-8).

    min_frequency: words seen fewer times map to <unk>; max_vocab: keep at most this many ids (specials
    included), the most frequent words first.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise TokenizerError("train_word_level needs at least one training file")
    for path in paths:
        if not path.is_file():
            raise TokenizerError(f"{path}: no such training file")

    def texts() -> Iterator[str]:
        for path in paths:
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise TokenizerError(f"{path}: not UTF-8 text (byte {err.start})") from None

    return word_level_from_texts(texts(), min_frequency=min_frequency, max_vocab=max_vocab, lowercase=lowercase,
                                 unk_token=unk_token, eos_token=eos_token, pad_token=pad_token)


def word_level_from_texts(texts: Iterable[str], *, min_frequency: int = 1, max_vocab: int | None = None,
                          lowercase: bool = False, unk_token: str = "<unk>", eos_token: str = "<eos>",
                          pad_token: str = "<pad>", special_tokens: Sequence[str] = ()) -> Tokenizer:
    """A word-level Tokenizer over the words of `texts` (each line end is <eos>); see train_word_level.
    special_tokens: more reserved tokens, after <pad> <unk> <eos>."""
    if min_frequency < 1:
        raise TokenizerError(f"min_frequency must be at least 1, got {min_frequency}")
    specials = list(dict.fromkeys([pad_token, unk_token, eos_token, *special_tokens]))
    counting = word_level_backend({unk_token: 0}, unk_token=unk_token, eos_token=eos_token, lowercase=lowercase)
    counts: Counter[str] = Counter()
    for text in texts:
        if counting.normalizer is not None:
            text = counting.normalizer.normalize_str(text)
        counts.update(word for word, _ in counting.pre_tokenizer.pre_tokenize_str(text))
    words = sorted((w for w, c in counts.items() if c >= min_frequency and w not in specials),
                   key=lambda w: (-counts[w], w))  # most frequent first; ties in a fixed (code point) order
    if max_vocab is not None:
        words = words[: max(0, max_vocab - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = word_level_backend(vocab, unk_token=unk_token, eos_token=eos_token, lowercase=lowercase)
    for token in special_tokens:
        backend.add_special_tokens([token])
    return Tokenizer(backend, special_tokens={"pad_token": pad_token, "unk_token": unk_token, "eos_token": eos_token})
