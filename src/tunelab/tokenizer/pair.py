"""Separate source and target vocabularies of an encoder-decoder: one tokenizer per side.

A model directory with separate vocabularies holds the source tokenizer's files at its top (as any model
directory) and the target tokenizer's in `target_tokenizer/`. With one shared vocabulary there is only the
top-level tokenizer, and code that needs "the target tokenizer" takes `target_tokenizer(tokenizer)`, which is
the tokenizer itself.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.tokenizer.base import Tokenizer

TARGET_DIR = "target_tokenizer"


class TokenizerPair:
    """A source tokenizer (what the encoder reads) and a target tokenizer (what the decoder writes).

    encode() encodes source text, decode() decodes target ids; the special-token ids and vocab_size are
    the source's (what padding the encoder input needs), `target` has the target side's.
    """

    def __init__(self, source: Tokenizer, target: Tokenizer) -> None:
        self.source = source
        self.target = target

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer | TokenizerPair":
        """The tokenizer of a model directory: a pair when it has a target_tokenizer/ directory."""
        path = Path(path)
        source = Tokenizer.from_dir(path)
        if path.is_dir() and (path / TARGET_DIR).is_dir():
            return cls(source, Tokenizer.from_dir(path / TARGET_DIR))
        return source

    def save(self, path: str | Path) -> None:
        self.source.save(path)
        self.target.save(Path(path) / TARGET_DIR)

    def encode(self, text: str, **kwargs) -> list[int]:
        return self.source.encode(text, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        return self.target.decode(ids, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.source.vocab_size

    pad_token_id = property(lambda self: self.source.pad_token_id)
    eos_token_id = property(lambda self: self.source.eos_token_id)
    bos_token_id = property(lambda self: self.source.bos_token_id)
    cls_token_id = property(lambda self: self.source.cls_token_id)
    sep_token_id = property(lambda self: self.source.sep_token_id)
    chat_template = property(lambda self: None)

    def __repr__(self) -> str:
        return f"TokenizerPair(source={self.source!r}, target={self.target!r})"


def source_tokenizer(tokenizer: "Tokenizer | TokenizerPair") -> Tokenizer:
    """The tokenizer of the source side (the tokenizer itself when the vocabulary is shared)."""
    return tokenizer.source if isinstance(tokenizer, TokenizerPair) else tokenizer


def target_tokenizer(tokenizer: "Tokenizer | TokenizerPair") -> Tokenizer:
    """The tokenizer of the target side (the tokenizer itself when the vocabulary is shared)."""
    return tokenizer.target if isinstance(tokenizer, TokenizerPair) else tokenizer
