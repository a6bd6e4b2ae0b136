"""Tokenization: the `Tokenizer` over Hugging Face's `tokenizers`, chat templates and streaming decoding.

    >>> tokenizer = load_tokenizer("path/to/model")        # a model directory or its tokenizer.json
    >>> tokenizer.encode("Hello world")
    >>> tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""

from __future__ import annotations

from pathlib import Path

from tunelab.tokenizer.base import StreamDecoder, Tokenizer
from tunelab.tokenizer.chat import render_chat_template


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory, or of a tokenizer.json file (see Tokenizer.from_dir)."""
    return Tokenizer.from_dir(path)


__all__ = ["StreamDecoder", "Tokenizer", "load_tokenizer", "render_chat_template"]
