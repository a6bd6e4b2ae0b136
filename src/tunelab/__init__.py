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

# Compiled kernels (matmul shapes and their buffers) that oneDNN keeps: see _bound_kernel_cache.
KERNEL_CACHE_CAPACITY = 64


def _bound_kernel_cache() -> None:
    """Keep oneDNN's cache of compiled kernels at KERNEL_CACHE_CAPACITY (its default is 1,024), unless the user
    set ONEDNN_PRIMITIVE_CACHE_CAPACITY.

    On a CPU, torch runs bf16 matmuls through oneDNN, which keeps each compiled kernel, with its own buffers, per
    shape. Training can meet a new shape at almost every step: BERT pretraining projects only the masked positions
    to the vocabulary, and their number changes from batch to batch. With the default cache that run
    (configs/wikitext2-bert-mlm.yaml, one thread) held 6.5-7.3 GB after 150 steps and 9.2 GB later; at 512-token pairs
    it reached 15 GB and the kernel killed it. With 64 kernels it held 2.4-2.5 GB and trained 4-7% faster, and jobs of
    few shapes kept their speed (BENCHMARKS.md). ideep's own cache (LRU_CACHE_CAPACITY) is left at its default:
    bounding it too cost classification 9% of its speed. oneDNN reads the variable when it builds its first
    kernel, so setting it when tunelab is imported is in time unless the process ran a bf16 matmul before."""
    _os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(KERNEL_CACHE_CAPACITY))


_bound_kernel_cache()


def load(source, *, dtype=None):
    """The model and its tokenizer from a registered name, an HF directory or a GGUF file."""
    from tunelab.checkpoint.load import load as _load

    return _load(source, dtype=dtype)


def save_pretrained(model, tokenizer, directory, *, dtype=None):
    """Write model and tokenizer as a Hugging Face directory."""
    from tunelab.checkpoint.load import save_pretrained as _save

    return _save(model, tokenizer, directory, dtype=dtype)


__all__ = ["__version__", "load", "save_pretrained"]
