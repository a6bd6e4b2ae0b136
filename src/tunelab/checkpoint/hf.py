"""Hugging Face model directories: config.json + model.safetensors (single or sharded) or pytorch_model.bin.

Reading gives our Model with every weight checked for name and shape; writing gives a directory that
transformers loads. Files are written under temporary names and renamed, so a crash never leaves a
half-written checkpoint behind under the real name.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.checkpoint import names as N
from tunelab.checkpoint.families import Architecture, architecture_for, architecture_for_heads, config_from_hf, config_to_hf
from tunelab.checkpoint.native import (is_native, is_native_family, native_config_from_json, native_config_to_json,
                                       native_state, saved_model_type)
from tunelab.errors import CheckpointError
from tunelab.models.base import Model
from tunelab.models.gpt2 import GPT2Config
from tunelab.models.registry import build_model

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# GPT-2's Conv1D layers store weights as [in, out]; ours are nn.Linear [out, in].
_GPT2_CONV1D = (".attn.qkv_proj.weight", ".attn.o_proj.weight", ".mlp.fc_in.weight", ".mlp.fc_out.weight")


def read_json(path: Path) -> dict:
    """A JSON object from `path`; CheckpointError naming the file and the line on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_hf_config(directory: Path) -> dict:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such model directory")
    return read_json(directory / "config.json")


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle/zip
        raise CheckpointError(f"{path}: cannot read PyTorch weights (truncated or corrupt?): {e}") from None


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory by their HF names (single file or sharded with an index)."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return _load_weight_file(path)
        index = read_json(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path}: no 'weight_map' object in the shard index")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_load_weight_file(directory / shard))
        missing = set(weight_map) - set(tensors)
        if missing:
            raise CheckpointError(f"{path}: tensors listed in the index are missing from the shards: {sorted(missing)[:5]}")
        return tensors
    raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def hf_to_ours(hf_tensors: dict[str, torch.Tensor], arch: Architecture, model: Model, source: str) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-2 transpose and split) HF tensors into our model's state dict names."""
    ours: dict[str, torch.Tensor] = {}
    unknown = []
    for hf_name, tensor in hf_tensors.items():
        name = None
        if hf_name.startswith(arch.prefix) or not arch.prefix:
            name = N.map_name(hf_name[len(arch.prefix):], arch.backbone_map)
        if name is None and arch.prefix and not hf_name.startswith(arch.prefix):
            # Bare-model checkpoints loaded into a head class, and head weights (never prefixed)
            name = N.map_name(hf_name, arch.backbone_map) or N.map_name(hf_name, arch.head_map)
        if name is None:
            if (not arch.pooler and "pooler." in hf_name) or N.is_ignored(hf_name):
                continue
            unknown.append(hf_name)
            continue
        ours[name] = tensor
    if unknown:
        raise CheckpointError(f"{source}: unexpected weights for {arch.name}: {', '.join(sorted(unknown)[:8])}")
    if isinstance(model.config, GPT2Config):
        ours = _gpt2_from_conv1d(ours)
    return ours


def _gpt2_from_conv1d(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        if name.endswith(_GPT2_CONV1D):
            t = t.t()
        if ".attn.qkv_proj." in name:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                out[name.replace("qkv_proj", part)] = chunk.contiguous()
        else:
            out[name] = t.contiguous()
    return out


def _gpt2_to_conv1d(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        if ".attn.q_proj." in name:
            t = torch.cat([t, sd[name.replace("q_proj", "k_proj")], sd[name.replace("q_proj", "v_proj")]], dim=0)
            name = name.replace("q_proj", "qkv_proj")
        elif ".attn.k_proj." in name or ".attn.v_proj." in name:
            continue
        out[name] = t.t().contiguous() if name.endswith(_GPT2_CONV1D) else t
    return out


def load_state(model: Model, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, checking that every weight is present and every shape matches."""
    expected = model.state_dict()
    tied = {"heads.lm.proj.weight", "heads.mlm.decoder.weight"} if getattr(model.config, "tie_embeddings", False) else set()
    missing = [k for k in expected if k not in state and k not in tied]
    if missing:
        raise CheckpointError(f"{source}: missing weights: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: weights the model does not have: {', '.join(extra[:8])}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: weight {name} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def read_hf_model(directory: str | Path, *, dtype: torch.dtype | None = None) -> Model:
    """Our Model from an HF directory, with the heads of its architecture."""
    directory = Path(directory)
    hf_config = read_hf_config(directory)
    config_source = str(directory / "config.json")
    if is_native(hf_config):
        return _native_model(hf_config, directory, dtype)
    architecture_for(hf_config, config_source)  # fail on an unknown architecture before reading weights
    return model_from_hf(hf_config, read_hf_weights(directory), str(directory), dtype=dtype)


def _native_model(hf_config: dict, directory: Path, dtype: torch.dtype | None) -> Model:
    """A model of a family without an HF architecture (checkpoint/native.py): weights under our own names."""
    config, heads = native_config_from_json(hf_config, str(directory / "config.json"))
    model = build_model(config, heads)  # not on meta: buffers (seq2seq's sinusoid table) are computed, not stored
    load_state(model, read_hf_weights(directory), str(directory))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def model_from_hf(
    hf_config: dict, hf_tensors: dict[str, torch.Tensor], source: str, *, dtype: torch.dtype | None = None
) -> Model:
    """Our Model from an HF config dict and HF-named tensors (from a directory or a GGUF file)."""
    arch = architecture_for(hf_config, source)
    config = config_from_hf(hf_config, source)
    try:
        with _skeleton():
            model = build_model(config, arch.heads, num_labels=_num_labels(arch, hf_tensors))
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. "hidden_size": "32", a negative size, 5 heads over 2
        raise CheckpointError(f"{source}: config.json describes a model that cannot be built: {e}") from None
    state = hf_to_ours(hf_tensors, arch, model, source)
    model = model.to_empty(device="cpu")
    _reset_buffers(model)
    load_state(model, state, source)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


@contextmanager
def _skeleton():
    """Modules built in here get parameters on the meta device (no memory; the checkpoint's weights are loaded
    next) and skip torch.nn.init's initialisers: drawing random numbers on meta goes through torch's reference
    ops, whose first use imports torch._dynamo, 0.85 s of every command that loads a checkpoint."""
    skipped = {name: getattr(torch.nn.init, name) for name in
               ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                "xavier_normal_", "zeros_", "ones_", "constant_", "orthogonal_")}
    try:
        for name in skipped:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in skipped.items():
            setattr(torch.nn.init, name, fn)


def _num_labels(arch: Architecture, hf_tensors: dict) -> int | None:
    for hf_name, our_name in arch.head_map.items():
        if our_name in ("heads.classifier.out", "heads.tagger.out"):
            weight = hf_tensors.get(f"{hf_name}.weight")
            if weight is not None:
                return weight.shape[0]
    return None


def _reset_buffers(model: Model) -> None:
    """Recompute non-persistent buffers lost by building on the meta device (rotary frequencies)."""
    from tunelab.models.llama import LlamaModel
    from tunelab.nn.positions import rope_inverse_frequencies

    if isinstance(model.backbone, LlamaModel):
        c = model.config
        model.backbone.rotary.inv_freq = rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)


def ours_to_hf(model: Model) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """Our state dict renamed to the HF architecture that matches the model's heads."""
    arch = architecture_for_heads(saved_model_type(model.config), set(model.heads.keys()))
    sd = dict(model.state_dict())
    if getattr(model.config, "tie_embeddings", False):
        sd.pop("heads.lm.proj.weight", None)
        sd.pop("heads.mlm.decoder.weight", None)
    if isinstance(model.config, GPT2Config):
        sd = _gpt2_to_conv1d(sd)
    backbone_inv, head_inv = N.invert(arch.backbone_map), N.invert(arch.head_map)
    out = {}
    for name, tensor in sd.items():
        if name.startswith("backbone.pooler.") and not arch.pooler:
            continue
        hf = N.map_name(name, backbone_inv)
        if hf is not None:
            out[arch.prefix + hf] = tensor
            continue
        hf = N.map_name(name, head_inv)
        if hf is None:
            raise CheckpointError(f"no Hugging Face name for weight {name} in {arch.name}")
        out[hf] = tensor
    return arch, out


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_hf_model(model: Model, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors that transformers loads (our own families without an HF
    architecture: the same layout with our model_type, see checkpoint/native.py); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_native_family(model.config):
        tensors, hf_config = native_state(model), native_config_to_json(model)
    else:
        arch, tensors = ours_to_hf(model)
        hf_config = config_to_hf(model.config, arch)
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu() for k, v in tensors.items()}
    sample = next(iter(tensors.values()))
    hf_config["torch_dtype"] = str(sample.dtype).removeprefix("torch.")
    _atomic_write(directory / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(
        directory / "config.json", lambda p: p.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    )
    return directory
