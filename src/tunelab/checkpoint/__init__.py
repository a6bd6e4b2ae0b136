"""Reading and writing checkpoints: Hugging Face directories, GGUF files, the registry of installed models."""

from tunelab.checkpoint.hf import model_from_hf, read_hf_model, write_hf_model
from tunelab.checkpoint.load import load, parse_dtype, resolve_source, save_pretrained
from tunelab.checkpoint.registry import REGISTRY, RegisteredModel, resolve_registered

__all__ = [
    "REGISTRY",
    "RegisteredModel",
    "load",
    "model_from_hf",
    "parse_dtype",
    "read_hf_model",
    "resolve_registered",
    "resolve_source",
    "save_pretrained",
    "write_hf_model",
]
