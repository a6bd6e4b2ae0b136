"""Parameter-efficient fine-tuning: LoRA, rsLoRA, DoRA, QLoRA (NF4 base), freezing, merge / unmerge, and
adapters in the PEFT library's format."""

from tunelab.peft.adapter_io import load_peft_adapter, save_peft_adapter
from tunelab.peft.freeze import freeze, trainable_parameters
from tunelab.peft.lora import (
    LoraSettings,
    LoRALinear,
    apply_lora,
    lora_disabled,
    lora_modules,
    lora_state_dict,
    merge_lora,
    unload_lora,
    unmerge_lora,
)

__all__ = [
    "LoRALinear",
    "LoraSettings",
    "apply_lora",
    "freeze",
    "load_peft_adapter",
    "lora_disabled",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "save_peft_adapter",
    "trainable_parameters",
    "unload_lora",
    "unmerge_lora",
]
