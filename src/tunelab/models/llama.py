"""The Llama family decoder (Touvron et al. 2023): Llama, Mistral, Qwen2, SmolLM2.

Pre-norm blocks with RMSNorm, rotary positions on queries and keys, grouped-query attention and a
SwiGLU MLP:
    h = x + Attention(RMSNorm(x));  y = h + W_down(silu(W_gate h') * W_up h'),  h' = RMSNorm(h)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tunelab.models.base import ModelConfig, decoder_attention_mask, default_position_ids
from tunelab.nn.attention import Attention
from tunelab.nn.kv_cache import KVCache
from tunelab.nn.mlp import GatedMLP
from tunelab.nn.norms import RMSNorm
from tunelab.nn.positions import RotaryEmbedding


@dataclass
class LlamaConfig(ModelConfig):
    model_type: str = "llama"
    num_kv_heads: int = 0  # 0 = num_heads (no grouping)
    head_dim: int = 0  # 0 = hidden_size // num_heads
    intermediate_size: int = 0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: True
    out_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral
    attention_dropout: float = 0.0

    family = "llama"

    def __post_init__(self) -> None:
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads:
            self.head_dim = self.head_dim or self.hidden_size // self.num_heads


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        dim = config.hidden_size
        self.attn_norm = RMSNorm(dim, config.rms_norm_eps)
        self.attn = Attention(
            dim,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            qkv_bias=config.qkv_bias,
            out_bias=config.out_bias,
            dropout=config.attention_dropout,
            layer_idx=layer_idx,
        )
        self.mlp_norm = RMSNorm(dim, config.rms_norm_eps)
        self.mlp = GatedMLP(dim, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)

    def forward(self, x, *, mask, is_causal, rope, cache) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask=mask, is_causal=is_causal, rope=rope, cache=cache)
        return x + self.mlp(self.mlp_norm(x))


class LlamaModel(nn.Module):
    """input ids [B, T] -> final-norm hidden states [B, T, D]."""

    causal = True

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, None]:
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(input_ids, past)
        mask, is_causal = decoder_attention_mask(
            attention_mask,
            input_ids.shape[1],
            past,
            document_ids=document_ids,
            sliding_window=self.config.sliding_window,
        )
        x = self.tok_embeddings(input_ids)  # [B, T, D]
        rope = self.rotary(position_ids, x.dtype)  # cos, sin [B, 1, T, head_dim]
        for layer in self.layers:
            x = layer(x, mask=mask, is_causal=is_causal, rope=rope, cache=cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.norm(x), None
