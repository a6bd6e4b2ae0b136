"""tunelab: fine-tune language models, from raw data to a deployed model.

    import tunelab
    model, tokenizer = tunelab.load("smollm2-135m-instruct")
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"


def _use_huge_pages() -> None:
    """Ask torch to put CPU tensors of 2 MB or more on transparent huge pages, unless the user decided
    (THP_MEM_ALLOC_ENABLE=0 turns it off) or the kernel offers none.

    Big tensors (activations, gradients, optimizer states, chunks of logits) go back to the kernel when freed,
    and the next step faults them in again, 4 KB at a time. In SmolLM2-135M full fine-tuning at 4 x 512 tokens
    on 2 cores that was 830,000 page faults in the first step and 250,000 to 830,000 in later ones; on 2 MB
    pages the later steps fault almost nothing, and the job took 41.5-42.5 s instead of 44.2-50.2 with a lower
    peak RSS (BENCHMARKS.md).
    torch reads the setting at its first allocation, so it applies when tunelab is imported before torch, as in
    the `tunelab` command."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            offered = "[never]" not in f.read()
    except OSError:  # not Linux, or a kernel without transparent huge pages
        return
    if offered:
        _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


_use_huge_pages()


def load(source, *, dtype=None):
    """The model and its tokenizer from a registered name, an HF directory or a GGUF file."""
    from tunelab.checkpoint.load import load as _load

    return _load(source, dtype=dtype)


def save_pretrained(model, tokenizer, directory, *, dtype=None):
    """Write model and tokenizer as a Hugging Face directory."""
    from tunelab.checkpoint.load import save_pretrained as _save

    return _save(model, tokenizer, directory, dtype=dtype)


__all__ = ["__version__", "load", "save_pretrained"]
