"""Reading GGUF files (llama.cpp's format) into Hugging Face names, shapes and config.

A GGUF file is a little-endian header (magic "GGUF", version, tensor count, key/value count), the
key/value metadata, one info record per tensor (name, dims in ggml's `ne` order, type, offset), then
the aligned tensor data. We parse the header ourselves (fast and bounds-checked; gguf.GGUFReader
walks every vocabulary string through numpy and takes seconds), view the tensor bytes through one
np.memmap, and dequantize with `gguf.quants.dequantize`.

What we undo on the way to Hugging Face's layout:

- ggml lists dims fastest-first (`ne[0]` is the row length), so a PyTorch shape is the dims reversed.
- llama.cpp's converter reorders the rows of Llama's q_proj / k_proj (and their biases) for its
  interleaved rotary layout: within each head, rows (i, i + d/2) become neighbours (2i, 2i + 1).
  HF's rotate-half convention wants them back, so we invert that permutation (n_head for q,
  n_head_kv for k). Qwen2 is converted without it.
- GPT-2 weights are stored as Linear [out, in]; HF's GPT-2 uses Conv1D [in, out], so we transpose.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tunelab.errors import CheckpointError

if TYPE_CHECKING:
    from tunelab.tokenizer.base import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2")
GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ---------------------------------------------------------------------------------------------
# Weight-name maps: GGUF name -> Hugging Face name, "{}" standing for the layer index.

LLAMA_GGUF_TO_HF: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
HF_TO_LLAMA_GGUF: dict[str, str] = {hf: gg for gg, hf in LLAMA_GGUF_TO_HF.items()}

GPT2_GGUF_TO_HF: dict[str, str] = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "transformer.h.{}.ln_1.weight",
    "blk.{}.attn_norm.bias": "transformer.h.{}.ln_1.bias",
    "blk.{}.attn_qkv.weight": "transformer.h.{}.attn.c_attn.weight",
    "blk.{}.attn_qkv.bias": "transformer.h.{}.attn.c_attn.bias",
    "blk.{}.attn_output.weight": "transformer.h.{}.attn.c_proj.weight",
    "blk.{}.attn_output.bias": "transformer.h.{}.attn.c_proj.bias",
    "blk.{}.ffn_norm.weight": "transformer.h.{}.ln_2.weight",
    "blk.{}.ffn_norm.bias": "transformer.h.{}.ln_2.bias",
    "blk.{}.ffn_up.weight": "transformer.h.{}.mlp.c_fc.weight",
    "blk.{}.ffn_up.bias": "transformer.h.{}.mlp.c_fc.bias",
    "blk.{}.ffn_down.weight": "transformer.h.{}.mlp.c_proj.weight",
    "blk.{}.ffn_down.bias": "transformer.h.{}.mlp.c_proj.bias",
}
HF_TO_GPT2_GGUF: dict[str, str] = {hf: gg for gg, hf in GPT2_GGUF_TO_HF.items()}

# GPT-2 weights that HF keeps as Conv1D [in, out] and GGUF as Linear [out, in].
GPT2_CONV1D_WEIGHTS = (
    "blk.{}.attn_qkv.weight", "blk.{}.attn_output.weight", "blk.{}.ffn_up.weight", "blk.{}.ffn_down.weight",
)

_LLAMA_REQUIRED = (
    "token_embd.weight", "output_norm.weight",
    "blk.{}.attn_norm.weight", "blk.{}.attn_q.weight", "blk.{}.attn_k.weight", "blk.{}.attn_v.weight",
    "blk.{}.attn_output.weight", "blk.{}.ffn_norm.weight", "blk.{}.ffn_gate.weight", "blk.{}.ffn_up.weight",
    "blk.{}.ffn_down.weight",
)
_GPT2_REQUIRED = (
    "token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias",
    "blk.{}.attn_norm.weight", "blk.{}.attn_norm.bias", "blk.{}.attn_qkv.weight", "blk.{}.attn_qkv.bias",
    "blk.{}.attn_output.weight", "blk.{}.attn_output.bias", "blk.{}.ffn_norm.weight", "blk.{}.ffn_norm.bias",
    "blk.{}.ffn_up.weight", "blk.{}.ffn_up.bias", "blk.{}.ffn_down.weight", "blk.{}.ffn_down.bias",
)
# Tensors that carry configuration rather than weights: Llama 3.1's rope factors become rope_scaling.
_CONFIG_TENSORS = {"rope_freqs.weight"}


# ---------------------------------------------------------------------------------------------
# The checkpoint


@dataclass
class GGUFCheckpoint:
    """A GGUF file read into Hugging Face terms: config.json contents, HF-named tensors, raw metadata."""

    path: Path
    architecture: str  # GGUF general.architecture
    hf_config: dict
    state_dict: dict[str, torch.Tensor]
    metadata: dict
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the file's metadata describes (built on first use)."""
        if self._tokenizer is None:
            from tunelab.tokenizer.gguf import tokenizer_from_gguf_metadata

            self._tokenizer = tokenizer_from_gguf_metadata(self.metadata, source=str(self.path))
        return self._tokenizer


def read_gguf_metadata(path: str | Path) -> dict:
    """All key/values of a GGUF file as plain Python values, without touching the tensor data."""
    return _read_header(Path(path)).metadata


def read_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """Read a GGUF file: dequantized tensors under HF names and shapes, an HF config, the metadata.

    Raises CheckpointError naming the file for a missing, truncated or non-GGUF file, an unknown
    architecture, an unsupported tensor type or missing metadata.
    """
    path = Path(path)
    header = _read_header(path)
    metadata = header.metadata
    architecture = metadata.get("general.architecture")
    if architecture is None:
        raise CheckpointError(f"{path}: GGUF metadata has no 'general.architecture'")
    if architecture not in _FAMILIES:
        raise CheckpointError(
            f"{path}: unknown architecture {architecture!r}; supported GGUF architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = _FAMILIES[architecture]
    shapes = {t.name: t.torch_shape for t in header.tensors}
    _check_tensor_names(shapes, family, metadata, architecture, path)

    raw = _raw_tensors(path, header)
    tied = "output.weight" not in raw or _same_bytes(raw["output.weight"], raw["token_embd.weight"])
    hf_config = family.build_config(metadata, architecture, shapes, tied, path)
    if "rope_freqs.weight" in raw and "rope_theta" in hf_config:
        scaling = llama3_scaling_from_factors(
            _dequantize(raw["rope_freqs.weight"], path), hf_config["rope_theta"], hf_config["head_dim"], path
        )
        if scaling is not None:
            hf_config["rope_scaling"] = scaling

    state_dict: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name in _CONFIG_TENSORS or (name == "output.weight" and tied):
            continue
        template, layer = _template(name)
        values = torch.from_numpy(_dequantize(tensor, path))
        values = family.transform(template, values, hf_config, name, path)
        hf_name = family.name_map[template].format(layer) if layer is not None else family.name_map[template]
        state_dict[hf_name] = values.to(dtype).contiguous()
    del raw
    return GGUFCheckpoint(path=path, architecture=architecture, hf_config=hf_config, state_dict=state_dict,
                          metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Header parsing (metadata and tensor infos), with every read bounds-checked.

# GGUF value type id -> (struct format, numpy dtype) of the scalar types.
_SCALAR_TYPES: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<B", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_BOOL, _STRING, _ARRAY = 7, 8, 9


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml ne order: dims[0] is the row length
    type_id: int
    offset: int  # from the start of the data section

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class _Header:
    version: int
    metadata: dict
    tensors: list[_TensorInfo]
    data_start: int


class _Cursor:
    """Sequential little-endian reads from a buffer that fail with CheckpointError past its end."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"{self.path}: truncated or corrupt GGUF file: reading {what} needs bytes "
                f"{self.pos}..{self.pos + n} but the file has {self.size} bytes"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self._need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} is not UTF-8 ({e})") from None

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        self._need(size, what)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += size
        return out

    def value(self, type_id: int, what: str) -> Any:
        if type_id == _STRING:
            return self.string(what)
        if type_id == _ARRAY:
            item_type = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if item_type in _SCALAR_TYPES:
                values = self.array(_SCALAR_TYPES[item_type][1], count, what)
                return [bool(v) for v in values] if item_type == _BOOL else values.tolist()
            if item_type not in (_STRING, _ARRAY):
                raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} has unknown item type {item_type}")
            self._need(count * 8, what)  # every string or array takes at least 8 bytes: a bound on count
            return [self.value(item_type, what) for _ in range(count)]
        if type_id in _SCALAR_TYPES:
            value = self.scalar(_SCALAR_TYPES[type_id][0], what)
            return bool(value) if type_id == _BOOL else value
        raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} has unknown value type {type_id}")


def _read_header(path: Path) -> _Header:
    """Metadata and tensor infos of a GGUF file; checks that every tensor's data lies inside the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file (expected a .gguf file)")
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 4:
                raise CheckpointError(f"{path}: not a GGUF file (only {size} bytes)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file: {e.strerror or e}") from None
    try:
        if buf[:4] != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
        cur = _Cursor(buf, path)
        cur.pos = 4
        version = cur.scalar("<I", "the version")
        if version & 0xFFFF == 0 and version != 0:
            raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors = cur.scalar("<Q", "the tensor count")
        n_kv = cur.scalar("<Q", "the key/value count")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            type_id = cur.scalar("<I", f"the type of {key!r}")
            metadata[key] = cur.value(type_id, f"metadata {key!r}")
        infos: list[_TensorInfo] = []
        for i in range(n_tensors):
            name = cur.string(f"the name of tensor #{i}")
            n_dims = cur.scalar("<I", f"tensor {name!r}")
            if n_dims > 8:
                raise CheckpointError(f"{path}: corrupt GGUF file: tensor {name!r} claims {n_dims} dims")
            dims = tuple(int(d) for d in cur.array("<u8", n_dims, f"tensor {name!r}"))
            type_id = cur.scalar("<I", f"tensor {name!r}")
            offset = cur.scalar("<Q", f"tensor {name!r}")
            infos.append(_TensorInfo(name, dims, type_id, offset))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(f"{path}: invalid general.alignment {alignment!r}")
        data_start = -(-cur.pos // alignment) * alignment
        for info in infos:
            try:
                qtype = GGMLQuantizationType(info.type_id)
            except ValueError:
                raise CheckpointError(
                    f"{path}: tensor {info.name!r} has unknown tensor type id {info.type_id}"
                ) from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elements = math.prod(info.dims)
            if info.dims and info.dims[0] % block:
                raise CheckpointError(
                    f"{path}: tensor {info.name!r}: row length {info.dims[0]} is not a multiple of the "
                    f"{qtype.name} block size {block}"
                )
            end = data_start + info.offset + n_elements // block * type_size
            if end > size:
                raise CheckpointError(
                    f"{path}: truncated GGUF file: tensor {info.name!r} ends at byte {end} "
                    f"but the file has {size} bytes"
                )
        return _Header(version, metadata, infos, data_start)
    finally:
        buf.close()


@dataclass(frozen=True)
class _RawTensor:
    """A tensor's bytes in the memory-mapped file, shaped as gguf.quants.dequantize expects them:
    [..., bytes of one row] as uint8 (gguf.GGUFReader's layout, without its slow metadata walk)."""

    name: str
    tensor_type: Any  # GGMLQuantizationType
    shape: np.ndarray  # ggml ne order
    data: np.ndarray


# Plain (non-block) types read by dtype rather than by gguf.quants.
_PLAIN_DTYPES = {"F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


def _raw_tensors(path: Path, header: _Header) -> dict[str, _RawTensor]:
    """Every tensor of the file as a read-only view into one np.memmap (bounds were checked by the header)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for info in header.tensors:
        qtype = GGMLQuantizationType(info.type_id)
        block, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = (info.dims[0] if info.dims else 1) // block * type_size
        rows = list(reversed(info.dims[1:]))
        start = header.data_start + info.offset
        data = mapped[start : start + row_bytes * math.prod(rows or [1])].reshape(*rows, row_bytes)
        if qtype.name in _PLAIN_DTYPES:
            data = data.view(_PLAIN_DTYPES[qtype.name])
        tensors[info.name] = _RawTensor(info.name, qtype, np.array(info.dims or (1,)), data)
    return tensors


# ---------------------------------------------------------------------------------------------
# Tensors


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    """A ReaderTensor as float32 in PyTorch's dim order (ggml's dims reversed), always a copy."""
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    qtype = tensor.tensor_type
    try:
        if qtype in (Q.F64, Q.I8, Q.I16, Q.I32, Q.I64):
            values = np.asarray(tensor.data, dtype=np.float32)
        elif qtype == Q.Q8_K:
            values = dequantize_q8_k(np.asarray(tensor.data))
        else:
            values = dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has type {qtype.name}, which cannot be dequantized "
            f"(unsupported tensor type)"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} ({qtype.name}) is malformed: {e}") from None
    out = np.ascontiguousarray(values, dtype=np.float32)
    if np.may_share_memory(out, tensor.data):
        out = out.copy()  # never hand out a view of the memory-mapped file
    return out.reshape(shape)


def dequantize_q8_k(blocks: np.ndarray) -> np.ndarray:
    """Q8_K blocks (float32 scale d, 256 int8 quants, 16 int16 partial sums) -> d * q, rows kept."""
    rows = blocks.reshape(-1, blocks.shape[-1])
    n_blocks = rows.shape[-1] // 292
    raw = rows.reshape(rows.shape[0], n_blocks, 292)
    d = raw[..., :4].copy().view("<f4").astype(np.float32)  # [R, B, 1]
    q = raw[..., 4:260].copy().view(np.int8).astype(np.float32)  # [R, B, 256]
    return (d * q).reshape(*blocks.shape[:-1], n_blocks * 256)


def _same_bytes(a: Any, b: Any) -> bool:
    """Whether two ReaderTensors hold the same type and bytes (an output layer duplicated from the embedding)."""
    return a.tensor_type == b.tensor_type and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, row 2i + j of GGUF is row j * d/2 + i of HF.

    w [n_head * head_dim, ...] (a weight or a bias) -> the same shape in HF's rotate-half order.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order from HF's (the inverse of `unpermute_rope_rows`), for GGUF writers."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def _template(name: str) -> tuple[str, int | None]:
    """"blk.3.attn_q.weight" -> ("blk.{}.attn_q.weight", 3); other names unchanged with None."""
    m = _LAYER_NAME.match(name)
    return (f"blk.{{}}.{m[2]}", int(m[1])) if m else (name, None)


def _check_tensor_names(shapes: dict, family: _Family, metadata: dict, arch: str, path: Path) -> int:
    """Every tensor has an HF name, every layer index is in range and every required tensor is there."""
    n_layers = _need_int(metadata, f"{arch}.block_count", path)
    unknown, bad_layer = [], []
    for name in shapes:
        template, layer = _template(name)
        if name in _CONFIG_TENSORS:
            continue
        if template not in family.name_map:
            unknown.append(name)
        elif layer is not None and layer >= n_layers:
            bad_layer.append(name)
    if unknown:
        raise CheckpointError(
            f"{path}: tensors that a {arch!r} model does not have: {', '.join(sorted(unknown)[:8])}"
            + (" ..." if len(unknown) > 8 else "")
        )
    if bad_layer:
        raise CheckpointError(
            f"{path}: tensors beyond {arch}.block_count = {n_layers}: {', '.join(sorted(bad_layer)[:8])}"
        )
    missing = [
        t.format(i) for t in family.required for i in (range(n_layers) if "{}" in t else [None])
        if t.format(i) not in shapes
    ]
    if missing:
        raise CheckpointError(
            f"{path}: missing tensors for a {arch!r} model: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    return n_layers


# ---------------------------------------------------------------------------------------------
# Configs


def _need(metadata: dict, key: str, path: Path) -> Any:
    if key not in metadata:
        raise CheckpointError(f"{path}: GGUF metadata has no {key!r}")
    return metadata[key]


def _need_int(metadata: dict, key: str, path: Path) -> int:
    value = _need(metadata, key, path)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(
            f"{path}: GGUF metadata {key!r} is {value!r}; a single integer is needed "
            "(per-layer values are not supported)"
        )
    return value


def _optional_int(metadata: dict, key: str, path: Path, default: int | None) -> int | None:
    return _need_int(metadata, key, path) if key in metadata else default


def _token_ids(metadata: dict) -> dict[str, int | None]:
    return {
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }


def rope_scaling_from_metadata(metadata: dict, arch: str) -> dict | None:
    """HF rope_scaling from `{arch}.rope.scaling.*` keys (None when absent or "none")."""
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind is None or kind == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(metadata.get(f"{arch}.rope.scaling.factor", 1.0))}
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if f"{arch}.rope.scaling.{gguf_key}" in metadata:
            scaling[hf_key] = float(metadata[f"{arch}.rope.scaling.{gguf_key}"])
    return scaling


def llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict | None:
    """HF's "llama3" rope_scaling from llama.cpp's rope_freqs tensor (per-frequency wavelength factors).

    Llama 3.1's rule (https://github.com/meta-llama/llama-models, `apply_scaling`) keeps short
    wavelengths, multiplies long ones by `factor` and blends between; only `factor` and the two
    wavelength bounds matter, so low_freq_factor is fixed at 1 and the rest is solved from the factors
    (high_freq_factor 4, Meta's value, when they leave it open). CheckpointError when nothing fits.
    """
    from tunelab.nn.positions import rope_inverse_frequencies

    f = factors.astype(np.float64).reshape(-1)
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    big = float(f.max())
    big = round(big) if abs(big - round(big)) < 1e-4 else big
    base = rope_inverse_frequencies(head_dim, theta).double().numpy()
    if base.shape != f.shape:
        raise CheckpointError(f"{path}: rope_freqs.weight has {f.size} values; {base.size} expected (head_dim / 2)")
    wavelen = 2 * math.pi / base
    medium = (f > 1 + 1e-6) & (f < big * (1 - 1e-6))
    # In the blended band s = a / wavelen - b, with a = original / (high - low) and b = low / (high - low).
    smooth = (1 / f[medium] - 1 / big) / (1 - 1 / big)
    if medium.sum() >= 2:
        a, b = np.polyfit(1 / wavelen[medium], smooth, 1)
        b = -b
        high, original = 1 + 1 / b, a / b
    else:
        high = 4.0
        b = 1 / (high - 1)
        if medium.sum() == 1:
            original = (smooth[0] + b) * wavelen[medium][0] / b
        else:  # any context between the kept and the scaled wavelengths gives the same frequencies
            lower = high * wavelen[f <= 1 + 1e-6].max(initial=0.0)
            upper = wavelen[f >= big * (1 - 1e-6)].min(initial=np.inf)
            original = 2 ** math.floor(math.log2(upper)) if upper < np.inf else lower
            if not lower < original <= upper:
                original = (lower + upper) / 2
    scaling = {
        "rope_type": "llama3", "factor": float(big), "low_freq_factor": 1.0,
        "high_freq_factor": float(round(high, 4)), "original_max_position_embeddings": int(round(original)),
    }
    expected = base / rope_inverse_frequencies(head_dim, theta, scaling).double().numpy()
    if not np.allclose(expected, f, rtol=1e-3, atol=1e-6):
        raise CheckpointError(
            f"{path}: rope_freqs.weight holds rope factors that match no Llama 3 rope scaling; not supported"
        )
    return scaling


def _llama_config(metadata: dict, arch: str, shapes: dict, tied: bool, path: Path) -> dict:
    """config.json of LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM from GGUF metadata."""
    def key(name: str) -> str:
        return f"{arch}.{name}"

    hidden = _need_int(metadata, key("embedding_length"), path)
    n_heads = _need_int(metadata, key("attention.head_count"), path)
    n_kv_heads = _optional_int(metadata, key("attention.head_count_kv"), path, n_heads)
    vocab, embed_dim = shapes["token_embd.weight"]
    if embed_dim != hidden:
        raise CheckpointError(f"{path}: token_embd.weight has width {embed_dim}, {key('embedding_length')} is {hidden}")
    q_rows = shapes["blk.0.attn_q.weight"][0]
    if q_rows % (2 * n_heads):
        raise CheckpointError(f"{path}: attn_q has {q_rows} rows, not a multiple of 2 x {n_heads} heads")
    head_dim = q_rows // n_heads
    intermediate = _optional_int(metadata, key("feed_forward_length"), path, None) or shapes["blk.0.ffn_gate.weight"][0]

    model_type = arch
    if arch == "llama":
        names = f"{metadata.get('general.basename', '')} {metadata.get('general.name', '')}".lower()
        model_type = "mistral" if "mistral" in names else "llama"
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[model_type]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": _need_int(metadata, key("block_count"), path),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(metadata.get(key("attention.layer_norm_rms_epsilon"), 1e-6)),
        "rope_theta": float(metadata.get(key("rope.freq_base"), 10000.0)),
        "max_position_embeddings": _optional_int(metadata, key("context_length"), path, 2048),
        "tie_word_embeddings": tied,
        **_token_ids(metadata),
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in shapes,
        "mlp_bias": False,
    }
    if model_type == "mistral":
        config["sliding_window"] = None  # llama.cpp attends to the whole context
    if model_type == "qwen2":
        config["use_sliding_window"] = False
    scaling = rope_scaling_from_metadata(metadata, arch)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _gpt2_config(metadata: dict, arch: str, shapes: dict, tied: bool, path: Path) -> dict:
    """config.json of GPT2LMHeadModel from GGUF metadata."""
    hidden = _need_int(metadata, "gpt2.embedding_length", path)
    vocab, embed_dim = shapes["token_embd.weight"]
    if embed_dim != hidden:
        raise CheckpointError(f"{path}: token_embd.weight has width {embed_dim}, gpt2.embedding_length is {hidden}")
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": vocab,
        "n_embd": hidden,
        "n_layer": _need_int(metadata, "gpt2.block_count", path),
        "n_head": _need_int(metadata, "gpt2.attention.head_count", path),
        "n_positions": shapes["position_embd.weight"][0],
        "n_inner": _optional_int(metadata, "gpt2.feed_forward_length", path, None) or shapes["blk.0.ffn_up.weight"][0],
        "layer_norm_epsilon": float(metadata.get("gpt2.attention.layer_norm_epsilon", 1e-5)),
        "activation_function": "gelu_new",
        "tie_word_embeddings": tied,
        **_token_ids(metadata),
    }


def _llama_transform(template: str, w: torch.Tensor, config: dict, name: str, path: Path) -> torch.Tensor:
    """Undo the q/k row permutation of llama.cpp's Llama converter (not applied to Qwen2)."""
    if config["model_type"] == "qwen2":
        return w
    if template.startswith("blk.{}.attn_q."):
        return unpermute_rope_rows(w, config["num_attention_heads"])
    if template.startswith("blk.{}.attn_k."):
        n_kv = config["num_key_value_heads"]
        if w.shape[0] % (2 * n_kv):
            raise CheckpointError(f"{path}: {name} has {w.shape[0]} rows, not a multiple of 2 x {n_kv} kv heads")
        return unpermute_rope_rows(w, n_kv)
    return w


def _gpt2_transform(template: str, w: torch.Tensor, config: dict, name: str, path: Path) -> torch.Tensor:
    """GGUF's Linear [out, in] -> HF GPT-2's Conv1D [in, out]."""
    return w.t() if template in GPT2_CONV1D_WEIGHTS else w


@dataclass(frozen=True)
class _Family:
    name_map: dict[str, str]
    required: tuple[str, ...]
    build_config: Callable[[dict, str, dict, bool, Path], dict]
    transform: Callable[[str, torch.Tensor, dict, str, Path], torch.Tensor]


_FAMILIES: dict[str, _Family] = {
    "llama": _Family(LLAMA_GGUF_TO_HF, _LLAMA_REQUIRED, _llama_config, _llama_transform),
    "qwen2": _Family(LLAMA_GGUF_TO_HF, _LLAMA_REQUIRED, _llama_config, _llama_transform),
    "gpt2": _Family(GPT2_GGUF_TO_HF, _GPT2_REQUIRED, _gpt2_config, _gpt2_transform),
}

__all__ = [
    "GGUFCheckpoint", "SUPPORTED_ARCHITECTURES", "read_gguf", "read_gguf_metadata",
    "LLAMA_GGUF_TO_HF", "HF_TO_LLAMA_GGUF", "GPT2_GGUF_TO_HF", "HF_TO_GPT2_GGUF",
    "permute_rope_rows", "unpermute_rope_rows",
]
