"""GPT-2 (Radford et al. 2019): learned positions, pre-LN blocks, tanh-GELU MLP, tied output embeddings.

    h = x + Attention(LN_1(x));  y = h + MLP(LN_2(h));  logits = LN_f(y) W_e^T
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tunelab.models.base import ModelConfig, decoder_attention_mask, default_position_ids
from tunelab.nn.attention import Attention
from tunelab.nn.kv_cache import KVCache
from tunelab.nn.mlp import MLP


@dataclass
class GPT2Config(ModelConfig):
    model_type: str = "gpt2"
    intermediate_size: int = 0  # 0 = 4 * hidden_size
    activation: str = "gelu_new"
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1  # residual and embedding dropout
    attention_dropout: float = 0.1
    tie_embeddings: bool = True

    family = "gpt2"


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        dim = config.hidden_size
        self.attn_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(
            dim, config.num_heads, qkv_bias=True, out_bias=True, dropout=config.attention_dropout, layer_idx=layer_idx
        )
        self.mlp_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = MLP(dim, config.intermediate_size or 4 * dim, config.activation, bias=True)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, *, mask, is_causal, cache) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), mask=mask, is_causal=is_causal, cache=cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT2Model(nn.Module):
    """input ids [B, T] -> final-norm hidden states [B, T, D]."""

    causal = True

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

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
        mask, is_causal = decoder_attention_mask(attention_mask, input_ids.shape[1], past, document_ids=document_ids)
        x = self.dropout(self.tok_embeddings(input_ids) + self.pos_embeddings(position_ids))  # [B, T, D]
        for layer in self.layers:
            x = layer(x, mask=mask, is_causal=is_causal, cache=cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.norm(x), None
