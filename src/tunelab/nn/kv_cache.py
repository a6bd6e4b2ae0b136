"""A preallocated key/value cache for autoregressive decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for the positions seen so far.

    Buffers are allocated once at `max_len` so decoding a token writes in place instead of
    concatenating. `length` counts the positions already stored; a model's forward writes its new
    positions at [length, length + T) in every layer and then calls `advance(T)`.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H_kv, T, D] of `layer` after the cached positions; return all [B, H_kv, length+T, D]."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_positions: int) -> None:
        self.length += num_positions

    def reorder(self, indices: torch.Tensor) -> None:
        """Keep batch rows `indices` (beam search), in that order.

        When the batch keeps its size (a beam step), only the positions stored so far are moved, in place;
        otherwise (expanding prompts into beams) the buffers are replaced.
        """
        if indices.shape[0] == self.keys[0].shape[0]:
            n = self.length
            for buffers in (self.keys, self.values):
                for buffer in buffers:
                    buffer[:, :, :n] = buffer[indices, :, :n]
            return
        self.keys = [k.index_select(0, indices) for k in self.keys]
        self.values = [v.index_select(0, indices) for v in self.values]
