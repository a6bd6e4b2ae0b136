"""Model directories in tunelab's own layout, for families that have no Hugging Face architecture to match
(the encoder-decoder Transformer of seq2seq.py).

The directory looks like an HF one: config.json (our config with `model_type` "tunelab-<family>" and the
names of the task heads), model.safetensors with our own weight names (a tied weight stored once) and the
tokenizer files. transformers does not read it; tunelab.load does, checking every weight's name and shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tunelab.checkpoint.hf import _atomic_write, _load_weight_file, load_state, read_json
from tunelab.errors import CheckpointError
from tunelab.models.base import Model

# config.json model_type -> our family
NATIVE_MODEL_TYPES = {"tunelab-seq2seq": "seq2seq"}


def is_native_config(hf_config: dict) -> bool:
    return hf_config.get("model_type") in NATIVE_MODEL_TYPES


def is_native_model(model: Model) -> bool:
    return model.config.model_type in NATIVE_MODEL_TYPES


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor (tied embeddings) once, under its first name."""
    seen: set[tuple[int, tuple, tuple]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def write_native_model(model: Model, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """config.json + model.safetensors in our layout; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in _unique_tensors(model.state_dict()).items()}
    config = {**model.config.to_dict(), "heads": list(model.heads.keys())}
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _atomic_write(directory / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(directory / "config.json", lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return directory


def read_native_model(directory: str | Path, *, dtype: torch.dtype | None = None) -> Model:
    """Our Model from a directory written by write_native_model; CheckpointError naming what is wrong."""
    from tunelab.models.registry import FAMILIES, build_model

    directory = Path(directory)
    source = str(directory / "config.json")
    data = read_json(directory / "config.json")
    family = NATIVE_MODEL_TYPES.get(data.get("model_type"))
    if family is None or data.get("family", family) != family:
        raise CheckpointError(f"{source}: model_type {data.get('model_type')!r} is not one of tunelab's own "
                              f"({', '.join(NATIVE_MODEL_TYPES)})")
    heads = data.get("heads", [])
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise CheckpointError(f"{source}: 'heads' must be a list of head names")
    try:
        config = FAMILIES[family][0].from_dict(data)
        model = build_model(config, heads)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: config.json describes a model that cannot be built: {e}") from None
    state = _load_weight_file(directory / "model.safetensors")
    load_state(model, state, str(directory))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
