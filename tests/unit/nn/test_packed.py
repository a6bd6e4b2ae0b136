"""The CPU inference fast paths: oneDNN-packed bf16 linears (nn/packed.py) and one-query attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.nn.attention import build_attention_mask, single_query_attention
from tunelab.nn.packed import _onednn_available, linear, linears, packed_linear

needs_onednn = pytest.mark.skipif(not _onednn_available(), reason="torch built without oneDNN")


def bf16_linear(k: int, n: int, *, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(torch.bfloat16)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linears_equal_each_layer_bit_for_bit(rows, bias):
    q, k, v = (bf16_linear(64, n, bias=bias, seed=s) for s, n in enumerate((64, 32, 32)))
    x = torch.randn(2, rows, 64).to(torch.bfloat16)
    with torch.no_grad():
        out = linears(x, q, k, v)
        assert [t.shape[-1] for t in out] == [64, 32, 32]
        for got, layer in zip(out, (q, k, v)):
            assert torch.equal(got, F.linear(x, layer.weight, layer.bias))
        assert torch.equal(linear(x, q), q(x))
        assert q.__dict__["_tunelab_packed"]  # the packed copy was made and kept


@needs_onednn
def test_a_changed_weight_is_packed_again():
    layer = bf16_linear(32, 16, bias=True, seed=0)
    x = torch.randn(1, 1, 32).to(torch.bfloat16)
    with torch.no_grad():
        before = linear(x, layer)
        layer.weight.mul_(2)  # in place: an optimizer step between GRPO's samples
        layer.bias.add_(1)
        assert torch.equal(linear(x, layer), layer(x))
        assert not torch.equal(linear(x, layer), before)
        layer.weight = nn.Parameter(torch.zeros_like(layer.weight))  # re-assigned
        assert torch.equal(linear(x, layer), layer.bias.expand(1, 1, 16))


def test_the_fast_path_stays_out_of_training_fp32_and_wrappers():
    layer = bf16_linear(16, 8, bias=False, seed=0)
    x = torch.randn(1, 2, 16).to(torch.bfloat16)
    assert packed_linear(x, layer) is None  # autograd on: the plain layer keeps its gradients
    with torch.no_grad():
        assert packed_linear(x.float(), layer.float()) is None

        class Wrapped(nn.Linear):
            pass

        wrapped = Wrapped(16, 8, bias=False).to(torch.bfloat16)
        assert packed_linear(x, wrapped) is None  # e.g. LoRA layers compute their own forward
        assert torch.equal(linear(x, wrapped), wrapped(x))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_single_query_attention_equals_sdpa(heads, kv_heads):
    torch.manual_seed(0)
    B, S, hd = 3, 9, 16
    q = torch.randn(B, heads, 1, hd, dtype=torch.float64)
    k, v = torch.randn(2, B, kv_heads, S, hd, dtype=torch.float64)
    padding = torch.ones(B, S, dtype=torch.long)
    padding[1, :4] = 0  # a left-padded row
    mask = build_attention_mask(padding, 1, S, causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    got = single_query_attention(q, k, v, mask)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-12
    low = single_query_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)  # bf16 in, fp32 inside
    assert low.dtype == torch.bfloat16
    assert (low.double() - expected).abs().max().item() < 0.03
