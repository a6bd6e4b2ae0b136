"""The BERT family encoder (Devlin et al. 2019): BERT, RoBERTa, MiniLM, DistilBERT-style configs.

Embeddings (token + position + segment) -> LayerNorm, then post-LN blocks:
    h = LN(x + Attention(x));  y = LN(h + W_2 act(W_1 h))
and a pooler tanh(W h_[CLS]) for sentence-level heads.

position_style "rotary" drops the position table and rotates each layer's queries and keys instead (RoFormer,
Su et al. 2021), so attention scores depend on relative offsets. Hugging Face's BERT classes cannot hold such a
model: it is saved in tunelab's own layout (checkpoint/native.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tunelab.models.base import ModelConfig
from tunelab.nn.attention import Attention, build_attention_mask
from tunelab.nn.mlp import MLP
from tunelab.nn.positions import RotaryEmbedding, sinusoidal_positions


@dataclass
class BertConfig(ModelConfig):
    model_type: str = "bert"
    intermediate_size: int = 0
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # 0: no segment embeddings (DistilBERT)
    layer_norm_eps: float = 1e-12
    # "absolute": a learned table over positions 0..T-1; "roberta": the same over positions counted over non-pad
    # tokens from pad_token_id + 1; "rotary": no table, rotary positions on queries and keys (rope_theta)
    position_style: str = "absolute"
    sinusoidal_positions: bool = False
    rope_theta: float = 10000.0
    add_pooler: bool = True
    tie_embeddings: bool = True  # MLM decoder shares the token embeddings

    family = "bert"

    def check(self) -> None:
        """ValueError naming the first field that cannot build a model."""
        if self.position_style not in POSITION_STYLES:
            raise ValueError(f"position_style must be one of {', '.join(POSITION_STYLES)}, got {self.position_style!r}")
        if self.position_style == "rotary" and self.sinusoidal_positions:
            raise ValueError("sinusoidal_positions needs a position table; position_style rotary has none")
        head_dim = self.hidden_size // max(self.num_heads, 1)
        if self.position_style == "rotary" and head_dim % 2:
            raise ValueError(f"position_style rotary needs an even head size, got {head_dim}")


POSITION_STYLES = ("absolute", "roberta", "rotary")


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        rotary = config.position_style == "rotary"
        self.pos = None if rotary else nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if config.sinusoidal_positions and self.pos is not None:
            self.pos.weight.data.copy_(sinusoidal_positions(config.max_position_embeddings, config.hidden_size))
            self.pos.weight.requires_grad_(False)
        self.segment = nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size else None
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.position_style == "roberta":
            # real tokens get pad+1, pad+2, ...; padding keeps position pad (RoBERTa's convention)
            real = (input_ids != self.config.pad_token_id).long()
            return torch.cumsum(real, dim=1) * real + self.config.pad_token_id
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids, token_type_ids=None, position_ids=None) -> torch.Tensor:
        if position_ids is None:
            position_ids = self.position_ids(input_ids)
        x = self.tok(input_ids)  # [B, T, D]
        if self.pos is not None:
            x = x + self.pos(position_ids)
        if self.segment is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.segment(token_type_ids)
        return self.dropout(self.norm(x))


class BertLayer(nn.Module):
    """Post-LN Transformer encoder block."""

    def __init__(self, config: BertConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = Attention(
            config.hidden_size,
            config.num_heads,
            qkv_bias=True,
            out_bias=True,
            dropout=config.attention_dropout,
            layer_idx=layer_idx,
        )
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=True)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: tuple | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, mask=mask, rope=rope)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class BertPooler(nn.Module):
    """pooled = tanh(W h_[CLS] + b) [B, D]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """The encoder: input ids [B, T] -> hidden [B, T, D], pooled [B, D] (or None without a pooler)."""

    causal = False

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, i) for i in range(config.num_layers))
        self.pooler = BertPooler(config.hidden_size) if config.add_pooler else None
        rotary = config.position_style == "rotary"
        self.rotary = RotaryEmbedding(config.hidden_size // config.num_heads, config.rope_theta) if rotary else None

    @property
    def tok_embeddings(self) -> nn.Embedding:
        return self.embeddings.tok

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cache is not None:
            raise TypeError("an encoder does not take a KV cache")
        T = input_ids.shape[1]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        mask = build_attention_mask(attention_mask, T, T, causal=False, document_ids=document_ids)
        if position_ids is None:
            position_ids = self.embeddings.position_ids(input_ids)
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # [B, T, D]
        rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None  # cos, sin [B, 1, T, hd]
        for layer in self.layers:
            x = layer(x, mask, rope)
        pooled = self.pooler(x) if self.pooler is not None else None
        return x, pooled
