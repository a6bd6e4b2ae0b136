"""Task heads that sit on a backbone's hidden states.

Every head takes (hidden [B, T, D], pooled [B, D] or None, attention_mask [B, T] or None) and returns logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.nn.activations import get_activation
from tunelab.nn.packed import linear


class LMHead(nn.Module):
    """Next-token logits: hidden [B, T, D] -> [B, T, V]. Its weight may be tied to the token embeddings."""

    def __init__(self, dim: int, vocab_size: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=bias)

    def forward(self, hidden, pooled=None, attention_mask=None) -> torch.Tensor:
        return linear(hidden, self.proj)


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense -> activation -> LayerNorm -> decoder (tied to the embeddings) + bias; [B, T, V]."""

    def __init__(self, dim: int, vocab_size: int, activation: str = "gelu", eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = get_activation(activation)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden, pooled=None, attention_mask=None) -> torch.Tensor:
        h = self.norm(self.act(self.dense(hidden)))
        return F.linear(h, self.decoder.weight, self.bias)  # W h + b in one pass over the [.., V] logits


class NextSentenceHead(nn.Module):
    """BERT's next-sentence prediction on the pooled [CLS] vector: [B, 2] (0 = is next, 1 = random)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, 2)

    def forward(self, hidden, pooled=None, attention_mask=None) -> torch.Tensor:
        return self.out(pooled)


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The hidden state of each row's last real token [B, D] (right or left padding)."""
    if attention_mask is None:
        return hidden[:, -1]
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=hidden.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def masked_max(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Max over the real tokens of each row: [B, T, D] -> [B, D]."""
    if attention_mask is None:
        return hidden.max(dim=1).values
    fill = torch.finfo(hidden.dtype).min
    return hidden.masked_fill(~attention_mask.bool()[:, :, None], fill).max(dim=1).values


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens of each row: [B, T, D] -> [B, D]."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype)[:, :, None]  # [B, T, 1]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


POOLINGS = ("pooled", "first", "last", "max", "mean", "concat")


class SequenceClassificationHead(nn.Module):
    """Class logits [B, C] from one vector per sequence.

    pooling: "pooled" (BERT: the pooler's tanh(W h_CLS)), "first" (the first token, with a dense + tanh
    layer as RoBERTa, or dense + ReLU as DistilBERT), "last" (the last real token; decoders), "max" or "mean"
    over the real tokens, or "concat": [last; max; mean], 3 x D wide (Howard & Ruder 2018, ULMFiT sec. 3.3).
    """

    def __init__(
        self,
        dim: int,
        num_labels: int,
        *,
        pooling: str = "pooled",
        dropout: float = 0.1,
        hidden_activation: str | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        self.pooling = pooling
        self.dense = nn.Linear(dim, dim) if hidden_activation else None
        self.act = get_activation(hidden_activation) if hidden_activation else None
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(3 * dim if pooling == "concat" else dim, num_labels, bias=bias)

    def forward(self, hidden, pooled=None, attention_mask=None) -> torch.Tensor:
        if self.pooling == "pooled":
            x = pooled
        elif self.pooling == "first":
            x = hidden[:, 0]
        elif self.pooling == "last":
            x = last_token(hidden, attention_mask)
        elif self.pooling == "max":
            x = masked_max(hidden, attention_mask)
        elif self.pooling == "mean":
            x = masked_mean(hidden, attention_mask)
        else:
            x = torch.cat([last_token(hidden, attention_mask), masked_max(hidden, attention_mask),
                           masked_mean(hidden, attention_mask)], dim=-1)  # [B, 3D]
        if self.dense is not None:
            x = self.act(self.dense(self.dropout(x)))
        return self.out(self.dropout(x))


class TokenClassificationHead(nn.Module):
    """Per-token label logits [B, T, C] (NER, semantic roles)."""

    def __init__(self, dim: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, num_labels)

    def forward(self, hidden, pooled=None, attention_mask=None) -> torch.Tensor:
        return self.out(self.dropout(hidden))


class SpanQAHead(nn.Module):
    """Extractive QA: start and end logits of the answer span, [B, T, 2] (Devlin et al. 2019, sec. 4.2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, 2)

    def forward(self, hidden, pooled=None, attention_mask=None) -> torch.Tensor:
        return self.out(hidden)
