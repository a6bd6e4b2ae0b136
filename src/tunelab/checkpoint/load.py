"""One entry point for every kind of model source: a registered name, an HF directory or a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.checkpoint.hf import model_from_hf, read_hf_model, read_json, write_hf_model
from tunelab.checkpoint.registry import REGISTRY, resolve_registered
from tunelab.errors import CheckpointError
from tunelab.models.base import Model
from tunelab.tokenizer.base import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_source(source: str | Path) -> Path:
    """A path that exists, or the files of a registered model name."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if str(source) in REGISTRY:
        return resolve_registered(str(source))
    raise CheckpointError(
        f"{source}: no such file or directory, and not a registered model name "
        f"(registered: {', '.join(REGISTRY)}; see `tunelab models`)"
    )


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load(source: str | Path, *, dtype: str | torch.dtype | None = None) -> tuple[Model, Tokenizer]:
    """The model and its tokenizer from a registered name, an HF directory or a GGUF file.

    >>> model, tokenizer = tunelab.load("smollm2-135m-instruct")
    """
    path = resolve_source(source)
    torch_dtype = parse_dtype(dtype)
    if path.is_file():
        if not _is_gguf(path):
            raise CheckpointError(f"{path}: not a GGUF file and not a model directory")
        from tunelab.checkpoint.gguf import read_gguf

        checkpoint = read_gguf(path)
        model = model_from_hf(checkpoint.hf_config, checkpoint.state_dict, str(path), dtype=torch_dtype)
        return model, checkpoint.tokenizer()
    model = read_hf_model(path, dtype=torch_dtype)  # our own families too (checkpoint/native.py)
    _apply_generation_config(model, path)
    return model, _directory_tokenizer(path)


def _directory_tokenizer(path: Path):
    """The tokenizer of a model directory (with separate source and target vocabularies: a TokenizerPair)."""
    from tunelab.tokenizer.pair import TokenizerPair

    return TokenizerPair.from_dir(path)


def generation_defaults(source: str | Path) -> dict:
    """generation_config.json of a model directory or of a run's model/ (empty when there is none): the decoding
    a model was trained to be used with (num_beams, length_penalty, max_new_tokens of its task.generation)."""
    path = Path(source).expanduser()
    for candidate in (path / "generation_config.json", path / "model" / "generation_config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError):
                return {}
    return {}


def _apply_generation_config(model: Model, directory: Path) -> None:
    """generation_config.json may list more EOS ids than config.json (chat models); take them."""
    path = directory / "generation_config.json"
    if path.exists():
        eos = read_json(path).get("eos_token_id")
        if eos is not None:
            model.config.eos_token_id = eos


def save_pretrained(model: Model, tokenizer: Tokenizer | None, directory: str | Path, *, dtype=None) -> Path:
    """An HF directory (config.json, model.safetensors, tokenizer files) that transformers loads; for a family
    with no HF architecture (rnn, seq2seq), the same files in tunelab's own layout (checkpoint/native.py)."""
    directory = Path(directory)
    write_hf_model(model, directory, dtype=parse_dtype(dtype))
    if tokenizer is not None:
        tokenizer.save(directory)
    eos = model.config.eos_token_id
    if eos is not None:
        generation = {"eos_token_id": eos, "bos_token_id": model.config.bos_token_id}
        if model.config.pad_token_id is not None:
            generation["pad_token_id"] = model.config.pad_token_id
        if model.is_encoder_decoder:
            generation["decoder_start_token_id"] = model.config.start_token_id
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return directory


def load_tokenizer(source: str | Path) -> Tokenizer:
    """Only the tokenizer of a registered name, HF directory, tokenizer.json or GGUF file (no weights are read)."""
    path = resolve_source(source)
    if path.is_file() and path.suffix == ".json":
        return Tokenizer.from_dir(path)  # a tokenizer.json on its own
    if path.is_file():
        if not _is_gguf(path):
            raise CheckpointError(f"{path}: not a GGUF file and not a model directory")
        from tunelab.checkpoint.gguf import read_gguf_metadata
        from tunelab.tokenizer.gguf import tokenizer_from_gguf_metadata

        return tokenizer_from_gguf_metadata(read_gguf_metadata(path), source=str(path))
    return _directory_tokenizer(path)
