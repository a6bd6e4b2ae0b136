"""One entry point for every kind of model source: a registered name, an HF directory or a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.checkpoint.hf import model_from_hf, read_hf_model, read_json, write_hf_model
from tunelab.checkpoint.registry import REGISTRY, resolve_registered
from tunelab.errors import CheckpointError
from tunelab.models.base import Model
from tunelab.nn.precision import cpu_computes_bf16
from tunelab.tokenizer.base import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def auto_dtype(stored: torch.dtype | None) -> torch.dtype:
    """dtype "auto", for inference: bf16 when the checkpoint's weights are stored in 16 bits or fewer (bf16, fp16,
    a quantized GGUF) and this machine computes bf16 natively; fp32 otherwise (fp32 checkpoints stay exact,
    and CPUs without bf16 instructions run bf16 slower than fp32). Decoding on bf16 weights takes the packed
    oneDNN path (nn/packed.py)."""
    if stored is None or stored == torch.float32 or stored == torch.float64:
        return torch.float32
    return torch.bfloat16 if cpu_computes_bf16() else torch.float32


def _stored_dtype(hf_config: dict) -> torch.dtype | None:
    """The weights' dtype an HF config.json names (torch_dtype, or "dtype" in newer transformers)."""
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def _gguf_stored_dtype(metadata: dict) -> torch.dtype | None:
    """fp32 for a GGUF file of fp32 tensors (general.file_type 0), bf16 standing for anything narrower (fp16,
    bf16, quantized: file types 1 and up); None when the file does not say."""
    file_type = metadata.get("general.file_type")
    if not isinstance(file_type, int):
        return None
    return torch.float32 if file_type == 0 else torch.bfloat16


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
    auto = dtype == "auto"
    torch_dtype = None if auto else parse_dtype(dtype)
    if path.is_file():
        if not _is_gguf(path):
            raise CheckpointError(f"{path}: not a GGUF file and not a model directory")
        from tunelab.checkpoint.gguf import read_gguf

        checkpoint = read_gguf(path)
        if auto:
            torch_dtype = auto_dtype(_gguf_stored_dtype(checkpoint.metadata))
        model = model_from_hf(checkpoint.hf_config, checkpoint.state_dict, str(path), dtype=torch_dtype)
        return model, checkpoint.tokenizer()
    if auto and (path / "config.json").is_file():
        torch_dtype = auto_dtype(_stored_dtype(read_json(path / "config.json")))
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
