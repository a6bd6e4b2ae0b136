"""Decoding with the KV cache gives the logits of a full pass, and greedy decoding matches transformers.

Each decoder reads a tiny random HF model (weights N(0, 0.3)); a sequence is run once without a cache and
again in chunks (one token at a time, or a prefill then single tokens) through `model.new_cache`. In
float64 the two agree to 1e-10, so the cached computation is the same maths; in fp32 they agree to 1e-5
relative to the logits' scale (|logits| reaches ~7 with these weights, and a different chunking changes the
matmul shapes and so the rounding by a few ulp, e.g. 1.6e-5 absolute on a logit of 5.8). A greedy loop written here, with and without the cache, picks the same 12 tokens as
transformers' generate(do_sample=False) on the same model.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.checkpoint.hf import read_hf_model

TOL = 1e-5  # fp32, relative to max(1, max |logit|)
TOL_FP64 = 1e-10
DECODERS = ["gpt2-lm", "llama-gqa", "qwen2", "mistral-window"]
NEW_TOKENS = 12
CHUNKINGS = {
    "token-by-token": [1] * 12,
    "chunks-5-4-3": [5, 4, 3],
    "prefill-then-tokens": [7, 1, 1, 1, 1, 1],
}


@pytest.fixture
def decoder(make_hf_model):
    """(hf_model, our model) for a case id."""

    def load(case: str):
        hf_model, path = make_hf_model(case)
        return hf_model, read_hf_model(path)

    return load


def run_in_chunks(model, ids, mask, positions, sizes):
    """Logits [B, T, V] of ids fed through a fresh KV cache in chunks of `sizes`."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    pieces, start = [], 0
    for size in sizes:
        end = start + size
        out = model(
            ids[:, start:end],
            None if mask is None else mask[:, :end],
            position_ids=None if positions is None else positions[:, start:end],
            cache=cache,
        )
        pieces.append(out.logits["lm"])
        start = end
    assert cache.length == ids.shape[1]
    return torch.cat(pieces, dim=1)


def fp32_tolerance(logits: torch.Tensor) -> float:
    return TOL * max(1.0, float(logits.abs().max()))


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("case", DECODERS)
def test_cached_chunks_equal_one_pass(tiny, decoder, case, chunking):
    _, model = decoder(case)
    ids = tiny.random_ids(2, tiny.SEQ, seed=4)
    with torch.no_grad():
        full = model(ids).logits["lm"]
        cached = run_in_chunks(model, ids, None, None, CHUNKINGS[chunking])
        assert tiny.record(f"kv-cache fp32 {case}", tiny.max_diff(cached, full)) <= fp32_tolerance(full)
        model = model.double()
        full = model(ids).logits["lm"]
        cached = run_in_chunks(model, ids, None, None, CHUNKINGS[chunking])
        assert cached.dtype == torch.float64
        assert tiny.record(f"kv-cache fp64 {case}", tiny.max_diff(cached, full)) <= TOL_FP64


@pytest.mark.parametrize("case", DECODERS)
def test_cached_chunks_equal_one_pass_left_padded(tiny, decoder, case):
    _, model = decoder(case)
    ids, mask = tiny.padded_batch([tiny.SEQ, 9, 4], tiny.SEQ, side="left", pad=tiny.PAD, seed=5)
    positions = tiny.left_padded_positions(mask)
    with torch.no_grad():
        for dtype, name, tol in ((torch.float32, "fp32", None), (torch.float64, "fp64", TOL_FP64)):
            model = model.to(dtype)
            full = model(ids, mask, position_ids=positions).logits["lm"]
            for sizes in ([1] * tiny.SEQ, [9, 1, 2]):
                cached = run_in_chunks(model, ids, mask, positions, sizes)
                diff = tiny.record(f"kv-cache {name} {case} left-padded", tiny.max_diff(cached, full, mask))
                assert diff <= (tol or fp32_tolerance(full))


def test_cache_length_advances_and_reports_full(tiny, decoder):
    _, model = decoder("llama-gqa")
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model(tiny.random_ids(1, 3), cache=cache)
        assert cache.length == 3
        model(tiny.random_ids(1, 1), cache=cache)
        assert cache.length == 4
        with pytest.raises(ValueError, match="full"):
            model(tiny.random_ids(1, 1), cache=cache)


def greedy(model, ids, mask, steps: int, use_cache: bool) -> torch.Tensor:
    """Greedy decoding written out: [B, steps] new tokens. Left padding allowed (mask 0 on the left)."""
    mask = mask.clone()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps) if use_cache else None
    new = []
    step_ids, step_pos = ids, positions
    for _ in range(steps):
        if use_cache:
            logits = model(step_ids, mask, position_ids=step_pos, cache=cache).logits["lm"]
        else:
            logits = model(ids, mask, position_ids=positions).logits["lm"]
        token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        new.append(token)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        step_pos = positions[:, -1:] + 1
        positions = torch.cat([positions, step_pos], dim=1)
        step_ids = token
    return torch.cat(new, dim=1)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("case", DECODERS)
def test_greedy_decoding_matches_transformers_generate(tiny, decoder, case, padded):
    from transformers import GenerationConfig

    hf_model, model = decoder(case)
    hf_model.generation_config.eos_token_id = None  # else min_new_tokens would ban token 2 and generate differs
    lengths = [6, 3, 5] if padded else [6, 6, 6]
    ids, mask = tiny.padded_batch(lengths, 6, side="left", pad=tiny.PAD, seed=6)
    with torch.no_grad():
        without_cache = greedy(model, ids, mask, NEW_TOKENS, use_cache=False)
        with_cache = greedy(model, ids, mask, NEW_TOKENS, use_cache=True)
        settings = GenerationConfig(
            do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            eos_token_id=None, pad_token_id=tiny.PAD, bos_token_id=None,
        )
        theirs = hf_model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)[:, ids.shape[1]:]
    assert theirs.shape == (3, NEW_TOKENS)
    assert torch.equal(with_cache, without_cache)
    assert torch.equal(with_cache, theirs), (with_cache, theirs)
    assert len(set(with_cache.flatten().tolist())) > 3  # not a degenerate repetition of one token
