"""Writing GGUF files (llama.cpp's format) from our models: the inverse of checkpoint/gguf.py.

What llama.cpp expects, and its converter (convert_hf_to_gguf.py) writes:

- tensor names `token_embd`, `blk.N.attn_q`, ... (the maps of checkpoint/gguf.py, inverted); an output
  layer tied to the embedding is left out, and llama.cpp reuses `token_embd.weight`;
- Llama's q_proj / k_proj rows permuted for its interleaved rotary layout (`permute_rope_rows`; not Qwen2);
  GPT-2's Conv1D weights as Linear [out, in];
- architecture metadata under `{arch}.*`, and the tokenizer under `tokenizer.ggml.*` (vocabulary in id
  order, token types, merges, special token ids, add_bos / add_eos) plus `tokenizer.chat_template`;
- with --quant q8_0 or f16 only the 2-D weight matrices change type; norms, biases and other 1-D tensors
  stay F32, and a matrix whose rows do not split into Q8_0's 32-value blocks falls back to F16.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.checkpoint.families import config_to_hf
from tunelab.checkpoint.gguf import HF_TO_GPT2_GGUF, HF_TO_LLAMA_GGUF, GPT2_CONV1D_WEIGHTS, permute_rope_rows
from tunelab.checkpoint.hf import ours_to_hf
from tunelab.errors import CheckpointError
from tunelab.export.files import staged_file
from tunelab.export.hf import merge_adapters
from tunelab.models.base import Model
from tunelab.tokenizer.base import Tokenizer
from tunelab.tokenizer.gguf import CONTROL, NORMAL, PRE_TOKENIZER_SPLITS, UNKNOWN, UNUSED, USER_DEFINED, BYTE

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0")
# our model_type -> GGUF general.architecture
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
_LAYER = re.compile(r"\.(\d+)\.")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")
# Canonical `tokenizer.ggml.pre` names for the split patterns our reader knows.
_PRE_NAMES = {PRE_TOKENIZER_SPLITS["llama-bpe"]: "llama-bpe", PRE_TOKENIZER_SPLITS["qwen2"]: "qwen2",
              PRE_TOKENIZER_SPLITS["tekken"]: "tekken", PRE_TOKENIZER_SPLITS["gpt-4o"]: "gpt-4o"}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as it goes into the file: PyTorch-order float32 values and the GGML type to store."""

    name: str
    values: np.ndarray
    qtype: Any  # gguf.GGMLQuantizationType


def gguf_architecture(model: Model, source: str = "the model") -> str:
    """GGUF's general.architecture for the model; CheckpointError for a family or head llama.cpp cannot run."""
    model_type = model.config.model_type
    if model_type not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: cannot export as gguf: {model_type} models have no GGUF writer "
            f"(supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
        )
    if set(model.heads.keys()) != {"lm"}:
        heads = ", ".join(model.heads) or "none"
        raise CheckpointError(f"{source}: cannot export as gguf: GGUF holds causal language models; this model's heads "
                              f"are {heads} (export it with --format hf)")
    if model_type == "mistral" and getattr(model.config, "sliding_window", None):
        raise CheckpointError(f"{source}: cannot export as gguf: sliding-window attention "
                              f"(window {model.config.sliding_window}) has no GGUF llama equivalent")
    return GGUF_ARCHITECTURES[model_type]


# ---------------------------------------------------------------------------------------------- metadata


def architecture_metadata(hf: dict, arch: str) -> dict[str, Any]:
    """`{arch}.*` keys from the HF config.json of the model."""
    if arch == "gpt2":
        return {
            "gpt2.context_length": hf["n_positions"],
            "gpt2.embedding_length": hf["n_embd"],
            "gpt2.feed_forward_length": hf.get("n_inner") or 4 * hf["n_embd"],
            "gpt2.block_count": hf["n_layer"],
            "gpt2.attention.head_count": hf["n_head"],
            "gpt2.attention.layer_norm_epsilon": float(hf["layer_norm_epsilon"]),
        }
    head_dim = hf["head_dim"]
    meta: dict[str, Any] = {
        f"{arch}.context_length": hf["max_position_embeddings"],
        f"{arch}.embedding_length": hf["hidden_size"],
        f"{arch}.block_count": hf["num_hidden_layers"],
        f"{arch}.feed_forward_length": hf["intermediate_size"],
        f"{arch}.attention.head_count": hf["num_attention_heads"],
        f"{arch}.attention.head_count_kv": hf["num_key_value_heads"],
        f"{arch}.rope.freq_base": float(hf["rope_theta"]),
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": float(hf["rms_norm_eps"]),
        f"{arch}.vocab_size": hf["vocab_size"],
    }
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        meta[f"{arch}.attention.key_length"] = head_dim
        meta[f"{arch}.attention.value_length"] = head_dim
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            meta[f"{arch}.rope.scaling.type"] = "linear"
            meta[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
        elif kind != "llama3":  # llama3 goes in the rope_freqs tensor
            raise CheckpointError(f"cannot export as gguf: rope scaling {kind!r} is not supported (linear, llama3 are)")
    return meta


def _pre_tokenizer_name(data: dict) -> str:
    """`tokenizer.ggml.pre` for a byte-level BPE tokenizer.json: which split regex it uses."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    for part in parts:
        if part.get("type") == "Split":
            pattern = part.get("pattern", {}).get("Regex")
            if pattern in _PRE_NAMES:
                return _PRE_NAMES[pattern]
    return "default"


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int, source: str = "the model") -> dict[str, Any]:
    """`tokenizer.ggml.*` and `tokenizer.chat_template` for a BPE tokenizer (byte-level: "gpt2"; SentencePiece
    style with "▁" and byte fallback: "llama"), the vocabulary padded with unused tokens to the model's rows."""
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{source}: cannot export as gguf: the tokenizer is {model.get('type')}, "
                              "GGUF export supports BPE tokenizers")
    pre = data.get("pre_tokenizer") or {}
    metaspace = "Metaspace" in json.dumps(pre) or bool(model.get("byte_fallback"))
    kind = tokenizer.extra_config.get("gguf_tokenizer_model") or ("llama" if metaspace else "gpt2")

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"{source}: cannot export as gguf: the tokenizer has ids up to {max(vocab.values())}, "
                              f"the model's embedding only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = BYTE if kind == "llama" and _BYTE_TOKEN.match(token) else NORMAL
    for index, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[index] = CONTROL if added.special else USER_DEFINED
    unk = tokenizer.unk_token_id
    if kind == "llama" and unk is not None and types[unk] == NORMAL:  # byte-level vocabularies mark no UNKNOWN
        types[unk] = UNKNOWN

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": kind,
        "tokenizer.ggml.pre": tokenizer.extra_config.get("gguf_pre_tokenizer")
        or (_pre_tokenizer_name(data) if kind == "gpt2" else "default"),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    if kind == "llama":
        # SentencePiece-style vocabularies are merged by score in llama.cpp: a merged piece scores minus its rank.
        scores = [0.0] * vocab_size
        for rank, merge in enumerate(merges):
            index = vocab.get(merge.replace(" ", ""))
            if index is not None and scores[index] == 0.0:
                scores[index] = -float(rank + 1)
        meta["tokenizer.ggml.scores"] = scores
        meta["tokenizer.ggml.add_space_prefix"] = '"prepend_scheme": "never"' not in json.dumps(pre)
    else:
        meta["tokenizer.ggml.add_space_prefix"] = False
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = value
    # Whether BOS / EOS are added is what encoding shows, whatever the post-processor looks like.
    plain, framed = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and framed[:1] == [bos] and framed[1:1 + len(plain)] == plain
    rest = framed[1:] if add_bos else framed
    meta["tokenizer.ggml.add_bos_token"] = bool(add_bos)
    meta["tokenizer.ggml.add_eos_token"] = bool(eos is not None and rest == [*plain, eos])
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


# ---------------------------------------------------------------------------------------------- tensors


def _stored_type(name: str, values: np.ndarray, quant: str):
    """The GGML type of one tensor under `quant`, as llama.cpp's converter chooses it."""
    from gguf.constants import GGMLQuantizationType as Q

    if quant == "f32" or values.ndim < 2 or name == "position_embd.weight" or name == "rope_freqs.weight":
        return Q.F32
    if quant == "q8_0":
        return Q.Q8_0 if values.shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[quant]


def gguf_tensors(model: Model, hf_config: dict, arch: str, quant: str) -> list[GGUFTensor]:
    """The model's weights under GGUF names, in llama.cpp's layouts, each with the type to store it as."""
    from tunelab.nn.positions import rope_inverse_frequencies

    name_map = HF_TO_GPT2_GGUF if arch == "gpt2" else HF_TO_LLAMA_GGUF
    _, hf_tensors = ours_to_hf(model)
    out = []
    for hf_name, tensor in hf_tensors.items():
        match = _LAYER.search(hf_name)
        template = hf_name[: match.start()] + ".{}." + hf_name[match.end():] if match else hf_name
        if template not in name_map:
            raise CheckpointError(f"cannot export as gguf: weight {hf_name} has no GGUF name in the {arch} layout")
        name = name_map[template].format(match.group(1) if match else None)
        gguf_template = name_map[template]
        w = tensor.detach().to(torch.float32).cpu()
        if arch == "llama" and gguf_template.startswith("blk.{}.attn_q."):
            w = permute_rope_rows(w, hf_config["num_attention_heads"])
        elif arch == "llama" and gguf_template.startswith("blk.{}.attn_k."):
            w = permute_rope_rows(w, hf_config["num_key_value_heads"])
        elif arch == "gpt2" and gguf_template in GPT2_CONV1D_WEIGHTS:
            w = w.t()
        values = np.ascontiguousarray(w.numpy())
        out.append(GGUFTensor(name, values, _stored_type(name, values, quant)))
    scaling = hf_config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":  # per-frequency factors, as llama.cpp stores Llama 3.1's rule
        base = rope_inverse_frequencies(hf_config["head_dim"], hf_config["rope_theta"])
        scaled = rope_inverse_frequencies(hf_config["head_dim"], hf_config["rope_theta"], scaling)
        factors = (base / scaled).to(torch.float32).numpy()
        out.append(GGUFTensor("rope_freqs.weight", factors, _stored_type("rope_freqs.weight", factors, quant)))
    return out


def _encode(tensor: GGUFTensor) -> np.ndarray:
    """The bytes GGUFWriter takes for the tensor's type: float arrays, or uint8 blocks for Q8_0 / BF16."""
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if tensor.qtype == Q.F32:
        return tensor.values.astype(np.float32)
    if tensor.qtype == Q.F16:
        return tensor.values.astype(np.float16)
    return quantize(tensor.values.astype(np.float32), tensor.qtype)


# ---------------------------------------------------------------------------------------------- writing


def add_metadata(writer, key: str, value: Any) -> None:
    """One metadata value on a gguf.GGUFWriter: bools, ints as uint32, floats as float32, strings; anything else
    as an array (int32, float32 or string items)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def export_gguf(model: Model, tokenizer: Tokenizer, out: str | Path, *, quant: str = "f16", name: str = "",
                source: str = "the model") -> Path:
    """Write the model (adapters merged, in place) and its tokenizer as a new GGUF file `out`.

    quant: "f32", "f16" (llama.cpp's default), "bf16" or "q8_0" for the 2-D weight matrices. The file is
    written under a temporary name and renamed when complete. CheckpointError for a model GGUF cannot hold.
    """
    from gguf import GGUFWriter
    from gguf.constants import GGML_QUANT_VERSION, LlamaFileType

    if quant not in GGUF_QUANTS:
        raise CheckpointError(f"unknown GGUF quantization {quant!r}; use one of {', '.join(GGUF_QUANTS)}")
    arch = gguf_architecture(model, source)
    merge_adapters(model)
    hf_config = config_to_hf(model.config, _lm_architecture(model))
    metadata: dict[str, Any] = {
        "general.type": "model",
        "general.name": name or Path(str(source)).stem,
        "general.file_type": int({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                                  "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[quant]),
        "general.quantization_version": GGML_QUANT_VERSION,
    }
    if model.config.model_type == "mistral":
        metadata["general.basename"] = "mistral"  # how readers tell Mistral from Llama
    metadata.update(architecture_metadata(hf_config, arch))
    metadata.update(tokenizer_metadata(tokenizer, hf_config["vocab_size"], source))
    tensors = gguf_tensors(model, hf_config, arch, quant)

    with staged_file(out) as tmp:
        writer = GGUFWriter(str(tmp), arch)
        try:
            for key, value in metadata.items():
                add_metadata(writer, key, value)
            for tensor in tensors:
                data = _encode(tensor)
                writer.add_tensor(tensor.name, data, raw_dtype=tensor.qtype if data.dtype == np.uint8 else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return Path(out)


def _lm_architecture(model: Model):
    from tunelab.checkpoint.families import architecture_for_heads

    return architecture_for_heads(model.config.model_type, set(model.heads.keys()))
