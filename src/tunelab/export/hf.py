"""A merged Hugging Face directory: adapters folded into the weights, tokenizer and chat template beside them."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.checkpoint.load import parse_dtype, save_pretrained
from tunelab.export.files import staged_directory
from tunelab.models.base import Model
from tunelab.peft.lora import lora_modules, unload_lora
from tunelab.tokenizer.base import Tokenizer


def merge_adapters(model: Model) -> Model:
    """The model with every LoRA / DoRA adapter merged into its base weight, in place (QLoRA's NF4 base comes
    back dense): a plain model that transformers can read. A model without adapters is returned unchanged."""
    if lora_modules(model):
        unload_lora(model)
    return model


def export_hf(model: Model, tokenizer: Tokenizer | None, out: str | Path, *,
              dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` (adapters merged, in place) and `tokenizer` as a new HF directory `out`.

    `transformers.AutoModelFor...from_pretrained(out)` gives our logits and `AutoTokenizer` our token ids.
    The files are written into a temporary directory that is renamed to `out` once complete.
    """
    merge_adapters(model)
    with staged_directory(out) as tmp:
        save_pretrained(model, tokenizer, tmp, dtype=parse_dtype(dtype))
    return Path(out)
