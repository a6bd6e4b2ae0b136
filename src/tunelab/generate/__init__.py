"""Inference: decoding for decoders (greedy, sampling, stop strings, streaming, KV cache), beam search for
encoder-decoders and decoders, and the single-pass predictions of encoders (embeddings, fill-mask)."""

from tunelab.generate.beam import BeamSettings, Hypothesis, beam_search, length_penalty, seq2seq_generate
from tunelab.generate.decode import (
    Completion,
    Generation,
    GenerationSettings,
    decode_tokens,
    encode_prompt,
    eos_ids,
    generate,
)
from tunelab.generate.encoders import Classification, MaskPrediction, classify, embed, fill_mask, mean_pool
from tunelab.generate.sampling import next_tokens
from tunelab.generate.stopping import StopStringFilter

__all__ = [
    "BeamSettings",
    "Hypothesis",
    "beam_search",
    "length_penalty",
    "seq2seq_generate",
    "Classification",
    "classify",
    "Completion",
    "Generation",
    "GenerationSettings",
    "MaskPrediction",
    "StopStringFilter",
    "decode_tokens",
    "embed",
    "encode_prompt",
    "eos_ids",
    "fill_mask",
    "generate",
    "mean_pool",
    "next_tokens",
]
