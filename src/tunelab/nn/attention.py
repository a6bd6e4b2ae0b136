"""Multi-head attention, softmax(Q K^T / sqrt(d_k) + M) V (Vaswani et al. 2017, eq. 1), with grouped-query
heads (Ainslie et al. 2023), rotary positions and a KV cache, over torch's scaled_dot_product_attention."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tunelab.nn.kv_cache import KVCache
from tunelab.nn.packed import linear, linears
from tunelab.nn.positions import apply_rotary


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_len: int,
    key_len: int,
    *,
    causal: bool,
    document_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """A boolean mask [B or 1, 1, T_q, T_k], True where a query may attend to a key; None = attend to all.

    attention_mask [B, T_k]: 1 for real tokens, 0 for padding (keys only; HF's convention).
    causal: query i (the last T_q of T_k positions) sees keys <= its own position.
    document_ids [B, T_k]: packed sequences; a query sees only keys of its own document.
    Rows that would see nothing (padding queries under a causal mask) are let to see every key, so
    softmax stays finite; their outputs are padding and never used.
    """
    if attention_mask is None and document_ids is None and sliding_window is None and not causal:
        return None
    device = attention_mask.device if attention_mask is not None else (
        document_ids.device if document_ids is not None else None
    )
    mask = torch.ones(1, 1, query_len, key_len, dtype=torch.bool, device=device)
    offset = key_len - query_len  # positions already in the KV cache
    q_pos = torch.arange(query_len, device=device)[:, None] + offset
    k_pos = torch.arange(key_len, device=device)[None, :]
    if causal:
        mask = mask & (k_pos <= q_pos)
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
    if document_ids is not None:
        q_doc = document_ids[:, -query_len:]
        mask = mask & (q_doc[:, None, :, None] == document_ids[:, None, None, :])
    return mask | ~mask.any(dim=-1, keepdim=True)


def short_sequence_attention(device: torch.device, length: int, *, max_length: int = 128):
    """A context that computes attention with the plain matmul-softmax-matmul kernel for short sequences on a CPU
    under bf16/fp16 autocast, where it is faster than torch's fused CPU kernel (3.4x for forward + backward at
    128 x 4 heads x 20 tokens, 1.4x at 128 tokens; measured in bf16, torch 2.13); a no-op otherwise."""
    if device.type != "cpu" or length > max_length or not torch.is_autocast_enabled("cpu"):
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q K^T / sqrt(d_k) + M) V for one query position per row (a decoding step), q [B, H, 1, hd] and
    k, v [B, Hkv, S, hd]: the G = H / Hkv query heads of a group as the rows of one matmul against their shared
    key/value head, in fp32. On a CPU this beats the fused kernel's cost per call (at batch 8 x 256 keys, bf16:
    152 us against 665; batch 1: 38 against 97; torch 2.13, 2 cores). mask [B or 1, 1, 1, S]: True = attend."""
    B, H, _, hd = q.shape
    Hkv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
    q_groups = q.reshape(B, Hkv, H // Hkv, hd).to(acc)  # query head h uses key/value head h // G
    scores = torch.matmul(q_groups, k.to(acc).transpose(-1, -2)) * hd**-0.5  # [B, Hkv, G, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.to(acc))  # [B, Hkv, G, hd]
    return out.reshape(B, H, 1, hd).to(q.dtype)


class Attention(nn.Module):
    """Self- or cross-attention with `num_heads` query heads sharing `num_kv_heads` key/value heads."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        dropout: float = 0.0,
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.head_dim = head_dim or dim // num_heads
        self.dropout = dropout
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=out_bias)

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        memory: torch.Tensor | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D].

        mask: from build_attention_mask, or None with is_causal for the plain causal case.
        rope: (cos, sin) [B, 1, T, head_dim] for the query positions.
        memory [B, S, D]: attend to these (cross-attention) instead of x.
        memory_kv: keys and values [B, Hkv, S, hd] of the memory, computed once by `project_memory` (a decoder
            reuses them at every step instead of projecting the encoder output again).
        """
        B, T, _ = x.shape
        if memory is None and memory_kv is None:  # self-attention: q, k and v from x in one matmul (inference)
            q, k, v = linears(x, self.q_proj, self.k_proj, self.v_proj)
            k, v = self._kv_heads(k), self._kv_heads(v)  # [B, Hkv, T, hd] each
        else:
            q = self.q_proj(x)
            k, v = memory_kv if memory_kv is not None else self.project_memory(memory)  # [B, Hkv, S, hd] each
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, past + S, hd]
        if T == 1 and q.device.type == "cpu" and not torch.is_grad_enabled():
            out = single_query_attention(q, k, v, mask)  # decoding: one new position per row
        else:
            with short_sequence_attention(q.device, k.shape[2]):
                out = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    dropout_p=self.dropout if self.training else 0.0,
                    is_causal=is_causal and mask is None,
                    enable_gqa=self.num_kv_heads != self.num_heads,
                )  # [B, H, T, hd]
        return linear(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim), self.o_proj)

    def project_memory(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `source` [B, S, D]: ([B, Hkv, S, hd], [B, Hkv, S, hd])."""
        return self._kv_heads(self.k_proj(source)), self._kv_heads(self.v_proj(source))

    def _kv_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, S, Hkv * hd] -> [B, Hkv, S, hd]."""
        B, S, _ = t.shape
        return t.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
