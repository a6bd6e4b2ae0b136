"""Position-wise feed-forward networks."""

from __future__ import annotations

import torch
from torch import nn

from tunelab.nn.activations import get_activation
from tunelab.nn.packed import linear, linears


class MLP(nn.Module):
    """FFN(x) = W_out act(W_in x + b_in) + b_out (Vaswani et al. 2017, eq. 2; BERT, GPT-2)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc_out = nn.Linear(hidden_dim, dim, bias=bias)
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.act(linear(x, self.fc_in)), self.fc_out)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(x, self.gate_proj, self.up_proj)  # one matmul at inference
        return linear(self.act(gate) * up, self.down_proj)
