"""LoRA adapters in the PEFT library's format: adapter_config.json + adapter_model.safetensors.

Tensors are named after the Hugging Face model's modules, "base_model.model.<HF module>.lora_A.weight"
([r, in]), ".lora_B.weight" ([out, r]) and, for DoRA, ".lora_magnitude_vector" ([out]); modules_to_save
are stored whole under "base_model.model.<HF parameter name>". Our module paths are translated with the
weight-name maps of tunelab.checkpoint (the Architecture that matches the model's heads).

GPT-2 fuses q, k and v into one Conv1D, c_attn. LoRA on our separate q/k/v projections is written exactly
as LoRA on c_attn: A = [A_q; A_k; A_v] (rank r_q + r_k + r_v), B block-diagonal, so B A stacks the three
updates B_q A_q, B_k A_k, B_v A_v; the rank and alpha of c_attn go in rank_pattern / alpha_pattern so that
PEFT's scaling equals ours. A c_attn adapter read back gives q, k and v the same A and their rows of B.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.checkpoint import names as N
from tunelab.checkpoint.families import ARCHITECTURES, Architecture, architecture_for_heads
from tunelab.checkpoint.hf import _atomic_write, _gpt2_to_conv1d, hf_to_ours, read_json
from tunelab.checkpoint.native import saved_model_type
from tunelab.errors import CheckpointError
from tunelab.peft.lora import LoraSettings, LoRALinear, apply_lora, lora_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
TASK_TYPES = {"lm": "CAUSAL_LM", "classifier": "SEQ_CLS", "tagger": "TOKEN_CLS", "qa": "QUESTION_ANS"}
_FUSED_QKV = ("q_proj", "k_proj", "v_proj")  # GPT-2's c_attn, in this order of output rows
# PEFT options that change what a LoRA layer or the base model computes and that we do not implement:
# (key, harmless values). Options that only choose the adapted layers (target_modules, exclude_modules,
# layers_to_transform) need no support: the tensors in the file say which layers are adapted.
_UNSUPPORTED = {
    "bias": ("none", None),
    "lora_bias": (False, None),
    "use_bdlora": (None, False),
    "use_qalora": (False, None),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
    "alora_invocation_tokens": (None, []),
}


def _is_gpt2(model) -> bool:
    return model.config.model_type == "gpt2"


def _architecture(model) -> Architecture:
    return architecture_for_heads(saved_model_type(model.config), set(model.heads.keys()))


def hf_module_name(path: str, arch: Architecture) -> str | None:
    """Our module path -> the HF module path in `arch` (GPT-2's q/k/v all give c_attn); None if unmapped."""
    if arch.model_type == "gpt2" and path.rsplit(".", 1)[-1] in _FUSED_QKV and ".attn." in path:
        path = path.rsplit(".", 1)[0] + ".qkv_proj"
    name = N.map_name(path + ".weight", N.invert(arch.backbone_map))
    if name is not None:
        return arch.prefix + name.removesuffix(".weight")
    name = N.map_name(path + ".weight", N.invert(arch.head_map))
    return None if name is None else name.removesuffix(".weight")


def _hf_linears(model, arch: Architecture) -> dict[str, list[str]]:
    """HF module path -> our linear module paths that make it up (one, or GPT-2's q, k, v in order)."""
    out: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, LoRALinear)) and not path.endswith((".lora_a", ".lora_b")):
            hf = hf_module_name(path, arch)
            if hf is not None:
                out.setdefault(hf, []).append(path)
    return out


def _hf_param_name(name: str, arch: Architecture) -> str:
    hf = N.map_name(name, N.invert(arch.backbone_map))
    if hf is not None:
        return arch.prefix + hf
    hf = N.map_name(name, N.invert(arch.head_map))
    if hf is None:
        raise CheckpointError(f"no Hugging Face name for {name} in {arch.name}")
    return hf


def _short_names(chosen: list[str], universe: list[str]) -> list[str]:
    """PEFT target_modules for `chosen`: for each module the shortest dotted suffix that selects only chosen
    modules (PEFT matches a name when a module path ends with "." + name)."""
    chosen_set, names = set(chosen), []
    for path in chosen:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            hits = {u for u in universe if u == suffix or u.endswith("." + suffix)}
            if hits <= chosen_set:
                break
        if suffix not in names:
            names.append(suffix)
    return sorted(names)


def _pattern_matches(pattern: str, key: str) -> bool:
    """PEFT's rule for rank_pattern / alpha_pattern keys: a regex matching a dotted suffix of the module path."""
    return re.match(rf"(.*\.)?({pattern})$", key) is not None


def _from_pattern(patterns: dict, key: str, default):
    for pattern, value in (patterns or {}).items():
        if _pattern_matches(pattern, key):
            return value
    return default


# ---------------------------------------------------------------------------------------------
# Saving


def _fuse(members: list[str], modules: dict[str, LoRALinear], model) -> tuple[dict[str, torch.Tensor], int, float]:
    """The PEFT tensors of one HF module from our layers (several for GPT-2's c_attn); (tensors, r, scaling)."""
    adapted = [modules[m] for m in members if m in modules]
    if len(members) == 1:  # one of our layers is one HF module
        layer = adapted[0]
        tensors = {"lora_A.weight": layer.lora_a.weight, "lora_B.weight": layer.lora_b.weight}
        if layer.dora:
            tensors["lora_magnitude_vector"] = layer.lora_magnitude
        return tensors, layer.r, layer.scaling
    # B_fused A_fused = [B_q A_q; B_k A_k; B_v A_v] with A_fused = [A_q; A_k; A_v] and B_fused block-diagonal;
    # blocks are rescaled so that one scaling s (the first adapted layer's) serves all three.
    scaling, rank = adapted[0].scaling, sum(layer.r for layer in adapted)
    layers = [model.get_submodule(m) for m in members]
    out_total = sum(layer.out_features for layer in layers)
    ref = adapted[0].lora_a.weight
    A = torch.zeros(rank, layers[0].in_features, dtype=ref.dtype, device=ref.device)
    B = torch.zeros(out_total, rank, dtype=ref.dtype, device=ref.device)
    magnitude = []
    row = col = 0
    for layer in layers:
        rows = slice(row, row + layer.out_features)
        if isinstance(layer, LoRALinear):
            cols = slice(col, col + layer.r)
            A[cols] = layer.lora_a.weight
            B[rows, cols] = layer.lora_b.weight * (layer.scaling / scaling)
            col += layer.r
            if layer.dora:
                magnitude.append(layer.lora_magnitude)
        else:  # not adapted: zero update, and for DoRA a magnitude that keeps the rows as they are
            magnitude.append(torch.linalg.norm(layer.weight.float(), dim=1).to(ref.dtype))
        row += layer.out_features
    tensors = {"lora_A.weight": A, "lora_B.weight": B}
    if adapted[0].dora:
        tensors["lora_magnitude_vector"] = torch.cat(magnitude)
    return tensors, rank, scaling


def save_peft_adapter(model, directory: str | Path, *, base_model: str = "") -> Path:
    """Write the model's adapters (and modules_to_save) as a PEFT adapter directory; returns the directory.

    `PeftModel.from_pretrained(hf_model, directory)` on the Hugging Face form of the base model gives the
    same outputs as our adapted model. Files are written under temporary names and renamed.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to save; apply_lora(model, settings) first")
    for flag in ("rslora", "dora"):
        if len({getattr(m, flag) for m in modules.values()}) > 1:
            raise CheckpointError(f"some adapted layers use {flag} and some do not; PEFT has one setting per adapter")
    settings: LoraSettings | None = getattr(model, "lora_settings", None)
    arch = _architecture(model)
    missing = [m for m in modules if hf_module_name(m, arch) is None]
    if missing:
        raise CheckpointError(f"no Hugging Face module for the adapted layers {', '.join(missing)} in {arch.name}")
    linears = _hf_linears(model, arch)
    first = next(iter(modules.values()))
    rslora, dora = first.rslora, first.dora

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}  # HF module -> (r, lora_alpha) as PEFT computes the scaling
    for hf, members in linears.items():
        if not any(m in modules for m in members):
            continue
        layer_tensors, r, scaling = _fuse(members, modules, model)
        for suffix, tensor in layer_tensors.items():
            tensors[f"{KEY_PREFIX}{hf}.{suffix}"] = tensor
        alpha = scaling * (math.sqrt(r) if rslora else r)
        ranks[hf] = (r, round(alpha, 12))

    default_r = settings.r if settings is not None else _most_common([r for r, _ in ranks.values()])
    default_alpha = settings.alpha if settings is not None else _most_common([a for _, a in ranks.values()])
    targets = _short_names(list(ranks), list(linears))
    rank_pattern, alpha_pattern = {}, {}
    for target in targets:
        group = [hf for hf in ranks if hf == target or hf.endswith("." + target)]
        values = {ranks[hf] for hf in group}
        if len(values) == 1:
            keyed = {target: ranks[group[0]]}
        else:
            keyed = {re.escape(hf): ranks[hf] for hf in group}
        for key, (r, alpha) in keyed.items():
            if r != default_r:
                rank_pattern[key] = r
            if alpha != default_alpha:
                alpha_pattern[key] = alpha

    save_names: list[str] = []
    for path in settings.modules_to_save if settings is not None else []:
        hf_modules, hf_tensors = _modules_to_save_tensors(model, path, arch)
        save_names += [m for m in hf_modules if m not in save_names]
        tensors.update({KEY_PREFIX + k: v for k, v in hf_tensors.items()})

    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model or None,
        "r": default_r,
        "lora_alpha": default_alpha,
        "lora_dropout": settings.dropout if settings is not None else 0.0,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": rslora,
        "use_dora": dora,
        "modules_to_save": save_names or None,
        "fan_in_fan_out": _is_gpt2(model),  # GPT-2's Conv1D stores weights as [in, out]
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return directory


def _most_common(values: list):
    return max(set(values), key=values.count)


def _common_module(names) -> str:
    """The longest module path that contains every parameter name ("" if none)."""
    common: list[str] = []
    for parts in zip(*(name.split(".")[:-1] for name in names)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _task_type(model) -> str | None:
    heads = set(model.heads.keys())
    if not heads:
        return "FEATURE_EXTRACTION"
    if len(heads) == 1:
        return TASK_TYPES.get(next(iter(heads)))
    return None


def _modules_to_save_tensors(model, path: str, arch: Architecture) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(HF module names, HF-named tensors) of one module trained in full: one HF module when its weights share
    one (BERT's "classifier"), else each (DistilBERT's "pre_classifier" and "classifier")."""
    state = {k: v for k, v in model.state_dict().items() if k.startswith(path + ".")}
    if _is_gpt2(model):
        try:
            state = _gpt2_to_conv1d(state)
        except KeyError:
            raise CheckpointError(
                f"modules_to_save {path}: GPT-2 fuses q/k/v into c_attn; save the whole attention module"
            ) from None
    hf = {_hf_param_name(k, arch): v for k, v in state.items()}
    common = _common_module(hf)
    if common:
        return [common], hf
    return sorted({name.rsplit(".", 1)[0] for name in hf}), hf


# ---------------------------------------------------------------------------------------------
# Loading


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such adapter directory")
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    config = read_json(config_path)
    path = directory / WEIGHTS_FILE
    if path.exists():
        try:
            return config, load_file(str(path)), path
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None
    path = directory / LEGACY_WEIGHTS_FILE
    if path.exists():
        try:
            return config, torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:  # torch raises many types for a bad pickle/zip
            raise CheckpointError(f"{path}: cannot read PyTorch weights (truncated or corrupt?): {e}") from None
    raise CheckpointError(f"{directory}: no adapter weights ({WEIGHTS_FILE} or {LEGACY_WEIGHTS_FILE})")


def _settings_from_config(config: dict, source: Path) -> LoraSettings:
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{source}: peft_type {config.get('peft_type')!r} is not supported (LORA only)")
    for key, harmless in _UNSUPPORTED.items():
        if config.get(key) not in harmless:
            raise CheckpointError(f"{source}: {key}={config[key]!r} is not supported")
    for key, kind in (("r", int), ("lora_alpha", (int, float)), ("lora_dropout", (int, float))):
        if key in config and (not isinstance(config[key], kind) or isinstance(config[key], bool)):
            raise CheckpointError(f"{source}: {key} must be a number, got {config[key]!r}")
    for key in ("use_dora", "use_rslora"):
        if not isinstance(config.get(key, False), bool):
            raise CheckpointError(f"{source}: {key} must be true or false, got {config[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise CheckpointError(f"{source}: {key} must be an object, got {config[key]!r}")
    try:
        return LoraSettings(
            r=config.get("r", 8),
            alpha=config.get("lora_alpha", 8),
            dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=["placeholder"],  # replaced by the modules found in the weights
            rslora=config.get("use_rslora", False),
            dora=config.get("use_dora", False),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(\.weight)?)$")


def _find_members(hf: str, linears: dict[str, list[str]], arch: Architecture) -> list[str] | None:
    """Our layers for an HF module path, also when the adapter was made on another HF class of the family
    (e.g. BertModel, no "bert." prefix, for our BertForSequenceClassification)."""
    if hf in linears:
        return linears[hf]
    prefixes = {a.prefix for a in ARCHITECTURES.values() if a.model_type == arch.model_type and a.prefix}
    bare = next((hf[len(p):] for p in prefixes if hf.startswith(p)), hf)
    for candidate in (arch.prefix + bare, bare):
        if candidate in linears:
            return linears[candidate]
    return None


def load_peft_adapter(model, directory: str | Path, *, quantize_base: bool = False):
    """Read a PEFT LoRA / DoRA adapter (ours or the peft library's) onto our model; returns the model.

    Applies LoRA to the layers the adapter has weights for, with its ranks, alphas, rsLoRA and DoRA settings,
    loads A, B, the magnitudes and modules_to_save, and leaves adapters and modules_to_save trainable.
    CheckpointError names the file and the problem for a malformed or mismatching adapter.
    """
    directory = Path(directory)
    config, tensors, source = _read_adapter(directory)
    settings = _settings_from_config(config, directory / CONFIG_FILE)
    settings.quantize_base = quantize_base
    arch = _architecture(model)
    linears = _hf_linears(model, arch)

    per_module: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise CheckpointError(f"{source}: tensor {key!r} does not start with {KEY_PREFIX!r}")
        name = key[len(KEY_PREFIX):]
        if ".lora_embedding_" in name or ".lora_A.bias" in name or ".lora_B.bias" in name:
            raise CheckpointError(f"{source}: {key}: LoRA on embeddings and LoRA biases are not supported")
        match = _LORA_KEY.match(name)
        if match is None:
            other[name] = tensor
            continue
        kind = match.group("kind").split(".")[0]
        per_module.setdefault(match.group("module"), {})[kind] = tensor
    if not per_module:
        raise CheckpointError(f"{source}: no LoRA weights (lora_A / lora_B) in the file")

    ranks: dict[str, tuple[int, float]] = {}
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for hf, parts in per_module.items():
        members = _find_members(hf, linears, arch)
        if members is None:
            raise CheckpointError(
                f"{source}: the adapter targets {hf!r}, which {arch.name} does not have "
                f"(its linear modules include {', '.join(sorted(linears)[:4])} ...)"
            )
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise CheckpointError(f"{source}: {hf} has no {part}.weight")
        A, B = parts["lora_A"], parts["lora_B"]
        layers = [model.get_submodule(m) for m in members]
        in_features, out_total = layers[0].in_features, sum(layer.out_features for layer in layers)
        if A.dim() != 2 or A.shape[1] != in_features:
            raise CheckpointError(
                f"{source}: {hf}.lora_A.weight has shape {tuple(A.shape)}, expected (r, {in_features})"
            )
        r = A.shape[0]
        if tuple(B.shape) != (out_total, r):
            raise CheckpointError(
                f"{source}: {hf}.lora_B.weight has shape {tuple(B.shape)}, expected ({out_total}, {r})"
            )
        r_config = _from_pattern(config.get("rank_pattern"), hf, settings.r)
        if r_config != r:
            raise CheckpointError(f"{source}: {hf} has rank {r} in the weights but {r_config} in {CONFIG_FILE}")
        alpha = _from_pattern(config.get("alpha_pattern"), hf, settings.alpha)
        magnitude = parts.get("lora_magnitude_vector")
        if settings.dora and magnitude is None:
            raise CheckpointError(f"{source}: use_dora is true but {hf} has no lora_magnitude_vector")
        if not settings.dora and magnitude is not None:
            raise CheckpointError(f"{source}: {hf} has a lora_magnitude_vector but use_dora is false")
        if magnitude is not None and tuple(magnitude.shape) != (out_total,):
            raise CheckpointError(
                f"{source}: {hf}.lora_magnitude_vector has shape {tuple(magnitude.shape)}, expected ({out_total},)"
            )
        row = 0
        for path, layer in zip(members, layers):
            rows = slice(row, row + layer.out_features)
            ranks[path] = (r, alpha)
            loaded[path] = {"lora_a": A, "lora_b": B[rows]}
            if magnitude is not None:
                loaded[path]["lora_magnitude"] = magnitude[rows]
            row += layer.out_features

    save_state, save_paths = _modules_to_save_state(other, config, arch, model, source)
    settings.target_modules = _our_target_names(model, list(ranks))
    settings.modules_to_save = save_paths
    try:
        apply_lora(model, settings, ranks=ranks)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    with torch.no_grad():
        for path, parts in loaded.items():
            layer = model.get_submodule(path)
            layer.lora_a.weight.copy_(parts["lora_a"])
            layer.lora_b.weight.copy_(parts["lora_b"])
            if "lora_magnitude" in parts:
                layer.lora_magnitude.copy_(parts["lora_magnitude"])
        for name, tensor in save_state.items():
            model.get_parameter(name).copy_(tensor)
    return model


def _our_target_names(model, paths: list[str]) -> list[str]:
    """Last path components when they select exactly `paths`, else the full paths."""
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {
        name
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, LoRALinear))
        and name.rsplit(".", 1)[-1] in short
        and not name.endswith((".lora_a", ".lora_b"))
    }
    return short if selected == set(paths) else paths


def _modules_to_save_state(
    hf_tensors: dict[str, torch.Tensor], config: dict, arch: Architecture, model, source: Path
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our-named tensors and module paths of the adapter's modules_to_save."""
    if not hf_tensors:
        return {}, []
    names = config.get("modules_to_save") or []
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in hf_tensors.items():
        entry = next((n for n in names if f".{n}." in f".{key}"), None)
        if entry is None:
            raise CheckpointError(
                f"{source}: tensor {KEY_PREFIX}{key} is neither a LoRA weight nor part of modules_to_save {names}"
            )
        groups.setdefault(entry, {})[key] = tensor
    state: dict[str, torch.Tensor] = {}
    paths: list[str] = []
    expected = model.state_dict()
    for entry, group in groups.items():
        ours = hf_to_ours(group, arch, model, str(source))
        for name, tensor in ours.items():
            if name not in expected:
                raise CheckpointError(f"{source}: modules_to_save weight {name} is not in the model")
            if tensor.shape != expected[name].shape:
                raise CheckpointError(
                    f"{source}: modules_to_save weight {name} has shape {tuple(tensor.shape)}, "
                    f"the model has {tuple(expected[name].shape)}"
                )
        state.update(ours)
        paths.append(_common_module(ours))
    return state, paths
