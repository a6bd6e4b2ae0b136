"""Tokenization: the `Tokenizer` over Hugging Face's `tokenizers`, chat templates, streaming decoding and
tokenizer training.

    >>> tokenizer = load_tokenizer("path/to/model")        # a model directory or its tokenizer.json
    >>> tokenizer.encode("Hello world")
    >>> tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    >>> train_tokenizer(["corpus.txt"], type="byte-bpe", vocab_size=8000, out="my-tokenizer")
"""

from __future__ import annotations

from pathlib import Path

from tunelab.tokenizer.base import StreamDecoder, Tokenizer
from tunelab.tokenizer.chat import render_chat_template
from tunelab.tokenizer.training import TOKENIZER_TYPES, train_tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory, or of a tokenizer.json file (see Tokenizer.from_dir)."""
    return Tokenizer.from_dir(path)


__all__ = ["StreamDecoder", "TOKENIZER_TYPES", "Tokenizer", "load_tokenizer", "render_chat_template", "train_tokenizer"]
