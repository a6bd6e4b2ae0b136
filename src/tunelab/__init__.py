"""tunelab: fine-tune language models, from raw data to a deployed model.

    import tunelab
    model, tokenizer = tunelab.load("smollm2-135m-instruct")
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(source, *, dtype=None):
    """The model and its tokenizer from a registered name, an HF directory or a GGUF file."""
    from tunelab.checkpoint.load import load as _load

    return _load(source, dtype=dtype)


def save_pretrained(model, tokenizer, directory, *, dtype=None):
    """Write model and tokenizer as a Hugging Face directory."""
    from tunelab.checkpoint.load import save_pretrained as _save

    return _save(model, tokenizer, directory, dtype=dtype)


__all__ = ["__version__", "load", "save_pretrained"]
