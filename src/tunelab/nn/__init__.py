"""Building blocks shared by every model family: attention, positions, norms, MLPs, the KV cache."""

from tunelab.nn.activations import get_activation
from tunelab.nn.attention import Attention, build_attention_mask
from tunelab.nn.kv_cache import KVCache
from tunelab.nn.mlp import MLP, GatedMLP
from tunelab.nn.norms import RMSNorm
from tunelab.nn.positions import RotaryEmbedding, apply_rotary, sinusoidal_positions

__all__ = [
    "Attention",
    "GatedMLP",
    "KVCache",
    "MLP",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "build_attention_mask",
    "get_activation",
    "sinusoidal_positions",
]
