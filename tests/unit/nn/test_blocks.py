"""Building blocks against their formulas: RMSNorm, sinusoidal and rotary positions, attention masks
(causal, padding, packed documents, sliding window), grouped-query attention, the KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tunelab.checkpoint.hf import read_hf_model
from tunelab.nn import Attention, KVCache, RMSNorm, RotaryEmbedding, apply_rotary, build_attention_mask
from tunelab.nn.positions import rope_inverse_frequencies, sinusoidal_positions


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- RMSNorm ----------------------------------------------------------------------------------------


def test_rms_norm_formula():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen(1)))
    x = 3 * torch.randn(2, 5, 16, generator=gen(2))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)
    assert torch.allclose(norm(x), F.rms_norm(x, (16,), norm.weight, eps=1e-5), atol=1e-6)
    # scale invariance: RMSNorm(c x) = RMSNorm(x) for c > 0 (up to eps)
    assert torch.allclose(norm(1000 * x), norm(x), atol=1e-5)


def test_rms_norm_bf16_is_computed_in_fp32():
    norm = RMSNorm(64).to(torch.bfloat16)
    x = (100 * torch.randn(4, 64, generator=gen(3))).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    x32 = x.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(out, expected)


# --- positions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [16, 7])
def test_sinusoidal_positions_formula(dim):
    pe = sinusoidal_positions(50, dim)
    assert pe.shape == (50, dim)
    expected = torch.zeros(50, dim, dtype=torch.float64)
    for pos in range(50):
        for j in range(dim):
            angle = pos / 10000 ** ((j - j % 2) / dim)  # 2i = j rounded down to even
            expected[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    assert torch.allclose(pe.double(), expected, atol=1e-4)  # fp32 sin of angles up to 49 rad


def rotate(x: torch.Tensor, rope: RotaryEmbedding, positions: list[int]) -> torch.Tensor:
    """x [H, D] rotated to each position: [1, H, len(positions), D]."""
    cos, sin = rope(torch.tensor([positions]), torch.float64)
    return apply_rotary(x[None, :, None, :].expand(1, -1, len(positions), -1), cos, sin)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}], ids=["default", "linear"])
def test_rotary_preserves_norm_and_depends_on_relative_position(scaling):
    rope = RotaryEmbedding(16, theta=10000.0, scaling=scaling).double()
    q, k = torch.randn(2, 3, 16, generator=gen(4), dtype=torch.float64)
    positions = [0, 1, 5, 17, 100]
    rq = rotate(q, rope, positions)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1)[None, :, None].expand_as(rq[..., 0]))
    # <R_m q, R_n k> depends only on m - n (Su et al. 2021, eq. 11)
    scores = {}
    for m, n in [(3, 1), (10, 8), (52, 50), (1000, 998)]:
        rq, rk = rotate(q, rope, [m]), rotate(k, rope, [n])
        scores[(m, n)] = (rq * rk).sum(-1)
    first = scores[(3, 1)]
    assert all(torch.allclose(s, first, atol=1e-9) for s in scores.values())
    assert not torch.allclose((rotate(q, rope, [4]) * rotate(k, rope, [1])).sum(-1), first, atol=1e-3)
    # position 0 is the identity
    assert torch.allclose(rotate(q, rope, [0])[0, :, 0], q)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
], ids=["linear", "llama3"])
def test_rope_scaling_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_scaling=dict(scaling))
    expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    ours = rope_inverse_frequencies(16, 10000.0, scaling)
    plain = rope_inverse_frequencies(16, 10000.0)
    assert torch.allclose(ours, expected, rtol=1e-6)
    assert not torch.allclose(ours, plain)
    if scaling["rope_type"] == "llama3":
        assert ours[0] == plain[0]  # short wavelengths kept
        assert torch.allclose(ours[-1], plain[-1] / 8)  # long ones divided by the factor


def test_unknown_rope_scaling_is_an_error():
    with pytest.raises(ValueError, match="supported: default, linear, llama3"):
        rope_inverse_frequencies(16, 10000.0, {"rope_type": "yarn", "factor": 2.0})


# --- attention masks ----------------------------------------------------------------------------------


def as_int(mask: torch.Tensor) -> list:
    return mask.int().tolist()


def test_mask_none_when_nothing_to_mask():
    assert build_attention_mask(None, 4, 4, causal=False) is None


def test_causal_mask_is_lower_triangular_with_cache_offset():
    mask = build_attention_mask(None, 4, 4, causal=True)
    assert mask.shape == (1, 1, 4, 4)
    assert torch.equal(mask[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    # two new queries after three cached positions see keys up to their own position (3 and 4)
    mask = build_attention_mask(None, 2, 5, causal=True)
    assert as_int(mask[0, 0]) == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_padding_mask_hides_padded_keys():
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    mask = build_attention_mask(attention_mask, 4, 4, causal=False)
    assert mask.shape == (2, 1, 4, 4)
    assert as_int(mask[1, 0]) == [[1, 1, 0, 0]] * 4
    assert as_int(mask[0, 0]) == [[1, 1, 1, 0]] * 4


def test_causal_left_padding_keeps_rows_finite():
    attention_mask = torch.tensor([[0, 0, 1, 1]])
    mask = build_attention_mask(attention_mask, 4, 4, causal=True)
    # padding queries would see nothing: they see everything instead (their outputs are never used)
    assert as_int(mask[0, 0]) == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 1, 1]]
    q = torch.randn(1, 1, 4, 8, generator=gen(5))
    out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert torch.isfinite(out).all()


def test_document_mask_confines_attention_to_each_document():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2]])
    both = build_attention_mask(None, 6, 6, causal=False, document_ids=docs)
    assert as_int(both[0, 0]) == [
        [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1],
    ]
    causal = build_attention_mask(None, 6, 6, causal=True, document_ids=docs)
    assert torch.equal(causal, both & torch.ones(6, 6, dtype=torch.bool).tril())
    # with a padded tail (document id of padding irrelevant: the key is masked anyway)
    padded = build_attention_mask(torch.tensor([[1, 1, 1, 1, 1, 0]]), 6, 6, causal=True, document_ids=docs)
    assert as_int(padded[0, 0, 4]) == [0, 0, 0, 1, 1, 0]


def test_sliding_window_mask():
    mask = build_attention_mask(None, 6, 6, causal=True, sliding_window=3)
    expected = torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)
    assert torch.equal(mask[0, 0], expected)  # query i sees keys i-2 .. i


@pytest.mark.parametrize("case", ["llama-gqa", "gpt2-lm", "bert-mlm"])
def test_packed_documents_equal_each_document_alone(tiny, make_hf_model, case):
    """One packed row with document_ids and restarted position_ids gives each document's own logits."""
    _, path = make_hf_model(case)
    model = read_hf_model(path)
    lengths = [5, 4, 3]
    docs = [tiny.random_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    document_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    position_ids = torch.cat([torch.arange(n)[None] for n in lengths], dim=1)
    head = next(iter(model.heads))
    with torch.no_grad():
        together = model(packed, document_ids=document_ids, position_ids=position_ids).logits[head]
        start = 0
        for doc in docs:
            alone = model(doc).logits[head]
            part = together[:, start:start + doc.shape[1]]
            assert tiny.record(f"packed {case}", tiny.max_diff(part, alone)) <= 1e-5
            start += doc.shape[1]
        unpacked = model(packed, position_ids=position_ids).logits[head]
    assert tiny.max_diff(unpacked[:, 5:], together[:, 5:]) > 1e-3  # without document_ids, documents mix


# --- attention ------------------------------------------------------------------------------------------


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def reference_attention(attn: Attention, x, mask, rope) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k) + M) V written out, with each k/v head repeated for its query group."""
    B, T, _ = x.shape
    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    cos, sin = rope
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # [B, H, T, hd]
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + torch.where(mask, 0.0, float("-inf"))
    out = scores.softmax(-1) @ v  # [B, H, T, hd]
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * hd))


def test_grouped_query_attention_equals_repeated_heads():
    attn = Attention(32, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, out_bias=True)
    randomize(attn, 6)
    x = torch.randn(2, 6, 32, generator=gen(7))
    padding = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    mask = build_attention_mask(padding, 6, 6, causal=True)
    rope = RotaryEmbedding(8)(torch.arange(6).expand(2, 6), torch.float32)
    with torch.no_grad():
        out = attn(x, mask=mask, rope=rope)
        expected = reference_attention(attn, x, mask, rope)
        # the same layer as plain multi-head attention with the k/v projections repeated per group
        mha = Attention(32, num_heads=4, num_kv_heads=4, head_dim=8, qkv_bias=True, out_bias=True)
        mha.q_proj.load_state_dict(attn.q_proj.state_dict())
        mha.o_proj.load_state_dict(attn.o_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(attn, name), getattr(mha, name)
            dst.weight.copy_(src.weight.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32))
            dst.bias.copy_(src.bias.view(2, 8).repeat_interleave(2, dim=0).reshape(32))
        repeated = mha(x, mask=mask, rope=rope)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out, repeated, atol=1e-5)


def test_is_causal_fast_path_equals_explicit_mask():
    attn = Attention(32, num_heads=4, num_kv_heads=1)
    randomize(attn, 8)
    x = torch.randn(1, 5, 32, generator=gen(9))
    with torch.no_grad():
        fast = attn(x, is_causal=True)
        explicit = attn(x, mask=build_attention_mask(None, 5, 5, causal=True))
    assert torch.allclose(fast, explicit, atol=1e-6)


def test_attention_heads_must_divide():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(32, num_heads=4, num_kv_heads=3)


# --- KV cache -------------------------------------------------------------------------------------------


def test_kv_cache_stores_appends_and_raises_when_full():
    cache = KVCache(num_layers=2, batch_size=1, num_kv_heads=2, head_dim=4, max_len=5)
    k1, v1 = torch.randn(2, 1, 2, 3, 4, generator=gen(10))
    k, v = cache.update(0, k1, v1)
    assert k.shape == (1, 2, 3, 4) and torch.equal(k, k1) and torch.equal(v, v1)
    cache.update(1, k1, v1)
    cache.advance(3)
    k2, v2 = torch.randn(2, 1, 2, 2, 4, generator=gen(11))
    k, v = cache.update(0, k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    cache.advance(2)
    assert cache.length == cache.max_len == 5
    with pytest.raises(ValueError, match="KV cache is full: 6 positions needed, 5 allocated"):
        cache.update(0, k2[:, :, :1], v2[:, :, :1])


def test_kv_cache_reorder_keeps_rows():
    cache = KVCache(num_layers=1, batch_size=3, num_kv_heads=1, head_dim=2, max_len=4)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    cache.update(0, k, k)
    cache.advance(2)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.keys[0][:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    assert cache.length == 2


def test_attention_with_cache_equals_full_sequence():
    attn = Attention(32, num_heads=4, num_kv_heads=2)
    randomize(attn, 12)
    x = torch.randn(1, 7, 32, generator=gen(13))
    rope_all = RotaryEmbedding(8)(torch.arange(7)[None], torch.float32)
    with torch.no_grad():
        full = attn(x, is_causal=True, rope=rope_all)
        cache = KVCache(1, 1, 2, 8, 7)
        parts = []
        for start, end in [(0, 4), (4, 5), (5, 7)]:
            rope = tuple(t[:, :, start:end] for t in rope_all)
            mask = build_attention_mask(None, end - start, end, causal=True)
            parts.append(attn(x[:, start:end], mask=mask, rope=rope, cache=cache))
            cache.advance(end - start)
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
