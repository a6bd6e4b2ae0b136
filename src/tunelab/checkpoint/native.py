"""Models that have no Hugging Face architecture (the recurrent LMs of rnn.py, the encoder-decoder Transformer
of seq2seq.py, a BERT with rotary positions), saved in HF's directory layout.

The directory looks like any HF model directory (config.json, model.safetensors, tokenizer files), so that
`tunelab.load`, `save_pretrained`, `tunelab eval` and run directories treat it the same way; config.json
names our own model type and holds our config's fields:

    {"model_type": "tunelab-rnn", "tunelab_format": 1, "family": "rnn", "heads": ["lm"],
     "cell": "lstm", "vocab_size": 13778, "hidden_size": 650, "num_layers": 2, ..., "torch_dtype": "float32"}

Weights keep our own module names (backbone.layers.0.weight_ih_l0, heads.lm.proj.weight, ...); a tensor
shared by several modules (tied embeddings) is stored once, under its first name. transformers cannot load
these directories; tunelab.load checks every weight's name and shape.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from tunelab.errors import CheckpointError
from tunelab.models.base import Model, ModelConfig
from tunelab.models.registry import FAMILIES, HEAD_NAMES

# config.json model_type -> our family
NATIVE_MODEL_TYPES = {"tunelab-rnn": "rnn", "tunelab-seq2seq": "seq2seq", "tunelab-bert": "bert"}
FORMAT_VERSION = 1
# config.json keys that are not fields of the family's config
_FRAME_KEYS = {"tunelab_format", "family", "heads", "torch_dtype", "architectures"}


def is_native(hf_config: dict) -> bool:
    return hf_config.get("model_type") in NATIVE_MODEL_TYPES


def saved_model_type(config: ModelConfig) -> str:
    """The model_type a saved config.json names: a BERT with rotary positions is "tunelab-bert", because
    transformers' BERT classes would load it with a (missing) position table."""
    if config.family == "bert" and getattr(config, "position_style", "") == "rotary":
        return "tunelab-bert"
    return config.model_type


def is_native_family(config: ModelConfig) -> bool:
    return saved_model_type(config) in NATIVE_MODEL_TYPES


def native_config_from_json(data: dict, source: str) -> tuple[ModelConfig, list[str]]:
    """(our config, head names) from a native config.json; CheckpointError naming the bad field."""
    model_type = data["model_type"]
    family = NATIVE_MODEL_TYPES[model_type]
    version = data.get("tunelab_format", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{source}: tunelab_format {version!r} is newer than this tunelab reads "
                              f"({FORMAT_VERSION}); upgrade tunelab")
    cls = FAMILIES[family][0]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known - _FRAME_KEYS)
    if unknown:
        raise CheckpointError(f"{source}: unknown {model_type} config field(s): {', '.join(unknown)}")
    heads = data.get("heads", [])
    if not isinstance(heads, list) or any(h not in HEAD_NAMES for h in heads):
        raise CheckpointError(f"{source}: 'heads' must be a list of head names ({', '.join(HEAD_NAMES)}), got {heads!r}")
    for f in fields(cls):
        if f.name in data and f.name in ("vocab_size", "hidden_size", "num_layers", "embedding_size") \
                and (not isinstance(data[f.name], int) or isinstance(data[f.name], bool)):
            raise CheckpointError(f"{source}: field {f.name!r} must be an integer, got {data[f.name]!r}")
    try:  # the family's own model_type ("bert" for "tunelab-bert")
        config = cls(**{k: v for k, v in data.items() if k in known and k != "model_type"})
        check = getattr(config, "check", None)
        if check is not None:
            check()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: config.json describes a model that cannot be built: {err}") from None
    if ({"classifier", "tagger"} & set(heads)) and not config.labels:
        raise CheckpointError(f"{source}: a classifier or tagger head needs 'labels' in config.json")
    return config, list(heads)


def native_config_to_json(model: Model) -> dict:
    """config.json of a native model: our config's fields plus the head names."""
    data = model.config.to_dict()
    return {**data, "model_type": saved_model_type(model.config), "tunelab_format": FORMAT_VERSION,
            "heads": sorted(model.heads.keys())}


def native_state(model: Model) -> dict[str, torch.Tensor]:
    """The weights to write under our names, each shared tensor (tied embeddings) once, under its first name."""
    seen: set[tuple[int, tuple, tuple]] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out
