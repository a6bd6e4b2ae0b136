"""A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) from a LoRA / DoRA model."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import CheckpointError
from tunelab.export.files import staged_directory
from tunelab.models.base import Model
from tunelab.peft.adapter_io import save_peft_adapter
from tunelab.peft.lora import lora_modules
from tunelab.tokenizer.base import Tokenizer


def export_peft(model: Model, tokenizer: Tokenizer | None, out: str | Path, *, base_model: str = "",
                source: str = "the model") -> Path:
    """Write the model's adapters as a new PEFT adapter directory `out` (with the tokenizer files beside them).

    `PeftModel.from_pretrained(<the HF base model>, out)` gives our logits. CheckpointError when the model has
    no adapters (a full fine-tune or a plain checkpoint: export it with format "hf" or "gguf").
    """
    if not lora_modules(model):
        raise CheckpointError(
            f"{source}: cannot export as peft: the model has no LoRA/DoRA adapters "
            "(a full model; export it with --format hf or gguf)"
        )
    with staged_directory(out) as tmp:
        save_peft_adapter(model, tmp, base_model=base_model)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out)
