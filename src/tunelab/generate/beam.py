"""Beam search with a length penalty, batched, for encoder-decoders and for decoder-only models.

Each input keeps `beam_size` partial hypotheses. At every step each of them is extended by every token;
the 2 * beam_size best extensions of an input (by total log-probability) are examined in order: one that
ends with EOS becomes a finished hypothesis (when it ranks among the first beam_size), the others fill the
beam_size live beams of the next step. An input is done when it has beam_size finished hypotheses (its
beams all ended); decoding stops when every input is done or after max_new_tokens, when the live beams
count as finished. The answer is the finished hypothesis with the best length-normalised score

    s(Y) = log P(Y | X) / lp(Y),    lp(Y) = ((5 + |Y|) / (5 + 1))^alpha

(Wu et al. 2016, "Google's Neural Machine Translation System", eq. 14), |Y| counting the generated tokens
with the final EOS. alpha = 0 ranks by log-probability alone, which favours short outputs; Vaswani et al.
(2017, sec. 6.1) translate with beam 4 and alpha 0.6. With beam_size 1 this is greedy decoding.

The source is encoded once and its cross-attention keys and values are computed once, then repeated for
the beams; the decoder's self-attention uses a KV cache whose rows follow the beams as they are reordered.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from tunelab.models.base import Model


@dataclass
class BeamSettings:
    """How to decode: beam_size 1 is greedy; length_penalty is GNMT's alpha."""

    beam_size: int = 4
    length_penalty: float = 0.6
    max_new_tokens: int = 128
    eos_token_ids: list[int] | None = None  # None: the model's and tokenizer's EOS

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {self.length_penalty}")


@dataclass
class Hypothesis:
    """A decoded output: its tokens (EOS excluded), log P, the normalised score and whether it reached EOS."""

    token_ids: list[int]
    log_prob: float
    score: float
    finished: bool


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016, eq. 14)."""
    return ((5.0 + length) / 6.0) ** alpha


@dataclass
class _Candidates:
    """The finished hypotheses of one input."""

    finished: list[Hypothesis] = field(default_factory=list)

    def best(self) -> Hypothesis:
        return max(self.finished, key=lambda h: h.score)


class _Seq2SeqSteps:
    """Decoder steps of an encoder-decoder: encode once, then one decoder position per step."""

    def __init__(self, model: Model, sources: list[list[int]], beams: int, max_steps: int, dtype) -> None:
        device = next(model.parameters()).device
        B, S = len(sources), max(len(s) for s in sources)
        ids = torch.zeros(B, S, dtype=torch.long, device=device)
        mask = torch.zeros(B, S, dtype=torch.long, device=device)
        for row, source in enumerate(sources):  # right padding: the encoder masks padded keys
            ids[row, : len(source)] = torch.tensor(source, device=device)
            mask[row, : len(source)] = 1
        self.model, self.device = model, device
        beam_rows = torch.arange(B, device=device).repeat_interleave(beams)  # [B * K]: source of each beam
        self.encoded = model.backbone.encode(ids, mask).select(beam_rows)
        self.cache = model.new_cache(B * beams, max_steps, dtype=dtype)
        self.next_input = torch.full((B * beams, 1), model.config.start_token_id, dtype=torch.long, device=device)

    def logits(self) -> torch.Tensor:
        """[B * K, V] next-token logits of every beam."""
        hidden = self.model.backbone.decode(self.next_input, self.encoded, cache=self.cache)  # [B*K, 1, D]
        return self.model.heads["lm"](hidden[:, -1])

    def advance(self, order: torch.Tensor, tokens: torch.Tensor) -> None:
        """Beams continue from rows `order` [B*K] with `tokens` [B*K]."""
        self.cache.reorder(order)  # the encoder output is the same for every beam of an input: no reorder
        self.next_input = tokens[:, None]


class _DecoderSteps:
    """Decoder-only steps: the left-padded prompts once (prefill), then one position per step."""

    def __init__(self, model: Model, prompts: list[list[int]], beams: int, max_steps: int, dtype) -> None:
        device = next(model.parameters()).device
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, T, dtype=torch.long, device=device)
        mask = torch.zeros(B, T, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, T - len(prompt):] = torch.tensor(prompt, device=device)
            mask[row, T - len(prompt):] = 1
        self.model, self.device = model, device
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        self.cache = model.new_cache(B, T + max_steps, dtype=dtype)
        hidden = model(ids, mask, position_ids=positions, cache=self.cache, heads=()).hidden  # prefill
        beam_rows = torch.arange(B, device=device).repeat_interleave(beams)
        self._first = model.heads["lm"](hidden[:, -1]).index_select(0, beam_rows)  # [B*K, V]
        self.cache.reorder(beam_rows)
        self.mask = mask.index_select(0, beam_rows)
        self.positions = positions[:, -1:].index_select(0, beam_rows)
        self.next_input: torch.Tensor | None = None

    def logits(self) -> torch.Tensor:
        if self.next_input is None:
            return self._first
        self.positions = self.positions + 1
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        hidden = self.model(self.next_input, self.mask, position_ids=self.positions, cache=self.cache,
                            heads=()).hidden
        return self.model.heads["lm"](hidden[:, -1])

    def advance(self, order: torch.Tensor, tokens: torch.Tensor) -> None:
        self.cache.reorder(order)
        self.mask = self.mask.index_select(0, order)
        self.positions = self.positions.index_select(0, order)
        self.next_input = tokens[:, None]


def _max_steps(model: Model, longest_input: int, requested: int) -> int:
    """max_new_tokens, capped where learned or tabled positions end."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if model.is_encoder_decoder:
        return min(requested, limit) if limit else requested
    if model.family == "gpt2" and limit:
        if longest_input >= limit:
            raise ValueError(f"the prompt has {longest_input} tokens; this model takes at most {limit}")
        return min(requested, limit - longest_input)
    return requested


@torch.inference_mode()
def beam_search(model: Model, inputs: list[list[int]], settings: BeamSettings, *,
                eos_token_ids: set[int] | None = None) -> list[Hypothesis]:
    """The best hypothesis for each input: source ids for an encoder-decoder, prompt ids for a decoder.

    All inputs are decoded together (batch rows = inputs x beam_size). eos_token_ids (or settings'):
    the tokens that end a hypothesis; default the model's EOS.
    """
    if "lm" not in model.heads:
        raise TypeError(f"this {model.family} model has no language-model head; it cannot generate")
    if not model.is_encoder_decoder and not model.is_decoder:
        raise TypeError(f"this {model.family} model is an encoder; beam search needs a decoder")
    if not inputs:
        return []
    if any(len(x) == 0 for x in inputs):
        raise ValueError("every input needs at least one token")
    stop = set(settings.eos_token_ids) if settings.eos_token_ids is not None else set(eos_token_ids or ())
    if not stop:
        eos = model.config.eos_token_id
        stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if not stop:
        raise ValueError("beam search needs an end-of-sequence token id (the model config names none)")
    K, B = settings.beam_size, len(inputs)
    steps_allowed = _max_steps(model, max(len(x) for x in inputs), settings.max_new_tokens)
    device_type = next(model.parameters()).device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    was_training = model.training
    model.eval()
    try:
        if model.is_encoder_decoder:
            stepper = _Seq2SeqSteps(model, inputs, K, steps_allowed, dtype)
        else:
            stepper = _DecoderSteps(model, inputs, K, steps_allowed, dtype)
        return search(stepper, B, K, steps_allowed, settings.length_penalty, stop)
    finally:
        model.train(was_training)


def search(stepper, B: int, K: int, max_steps: int, alpha: float, stop: set[int]) -> list[Hypothesis]:
    """The beam search itself, over any `stepper` that holds B inputs x K beams (rows b * K + k):

    stepper.logits() -> [B*K, V]  next-token logits of every beam (its state: the tokens chosen so far);
    stepper.advance(order, tokens)  the next beams continue rows `order` [B*K] with `tokens` [B*K].
    stepper.device                  where its tensors are.
    """
    device = stepper.device
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam per input at the start, so the first step's K beams differ
    history = torch.zeros(B * K, 0, dtype=torch.long, device=device)  # generated tokens of each beam
    results = [_Candidates() for _ in range(B)]
    done = [False] * B
    for step in range(max_steps):
        log_probs = torch.log_softmax(stepper.logits().float(), dim=-1)  # [B*K, V]
        V = log_probs.shape[-1]
        totals = (scores.view(-1, 1) + log_probs).view(B, K * V)
        top_scores, top_index = totals.topk(min(2 * K, K * V), dim=1)  # [B, 2K]
        top_scores, top_beam, top_token = top_scores.tolist(), (top_index // V).tolist(), (top_index % V).tolist()
        new_scores = torch.full((B, K), float("-inf"), device=device)
        order = torch.arange(B * K, device=device)  # parent row of each next beam
        tokens = torch.full((B * K,), next(iter(stop)), dtype=torch.long, device=device)
        rows_history = history.tolist() if any(t in stop for row in top_token for t in row) else None
        for b in range(B):
            if done[b]:
                continue
            kept = 0
            for rank, (score, beam, token) in enumerate(zip(top_scores[b], top_beam[b], top_token[b])):
                if score == float("-inf"):
                    break
                if token in stop:
                    if rank < K:  # an EOS ranked below the beam width would not have been kept
                        generated = rows_history[b * K + beam]
                        results[b].finished.append(
                            Hypothesis(generated, score, score / length_penalty(len(generated) + 1, alpha), True))
                    continue
                new_scores[b, kept] = score
                order[b * K + kept] = b * K + beam
                tokens[b * K + kept] = token
                kept += 1
                if kept == K:
                    break
            if len(results[b].finished) >= K:
                done[b] = True
                new_scores[b] = float("-inf")
        if all(done):
            break
        scores = new_scores
        history = torch.cat([history.index_select(0, order), tokens[:, None]], dim=1)
        stepper.advance(order, tokens)
    else:
        # out of steps: the live beams count as (unfinished) hypotheses
        rows = history.tolist()
        for b in range(B):
            if done[b]:
                continue
            for k in range(K):
                score = float(scores[b, k])
                if score != float("-inf"):
                    generated = rows[b * K + k]
                    results[b].finished.append(
                        Hypothesis(generated, score, score / length_penalty(len(generated), alpha), False))
    return [r.best() for r in results]


def beam_search_texts(model: Model, tokenizer, inputs: list[list[int]], settings: BeamSettings, *,
                      batch_size: int = 32, autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                      eos_token_ids: set[int] | None = None) -> list[str]:
    """Decode many inputs (token id lists) in batches of similar length; the outputs' text, in input order.

    `tokenizer` decodes the outputs (for an encoder-decoder with separate vocabularies, the target tokenizer).
    """
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]), reverse=True)
    outputs: list[str] = [""] * len(order)
    context = autocast or contextlib.nullcontext
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        with context():
            best = beam_search(model, [inputs[i] for i in chunk], settings, eos_token_ids=eos_token_ids)
        for i, hypothesis in zip(chunk, best):
            outputs[i] = tokenizer.decode(hypothesis.token_ids, skip_special_tokens=True)
    return outputs


def seq2seq_generate(model: Model, tokenizer, texts: list[str], settings: BeamSettings | None = None, *,
                     batch_size: int = 32) -> list[str]:
    """Translate or summarize: each source text through an encoder-decoder, decoded with beam search.

    >>> model, tokenizer = tunelab.load("runs/multi30k-transformer/model")
    >>> seq2seq_generate(model, tokenizer, ["A dog runs on the beach."], BeamSettings(beam_size=4))
    """
    from tunelab.tokenizer.pair import source_tokenizer, target_tokenizer

    if not model.is_encoder_decoder:
        raise TypeError(f"this {model.family} model is not an encoder-decoder; use generate() or beam_search()")
    encoded = [source_tokenizer(tokenizer).encode(text) for text in texts]
    outputs = beam_search_texts(model, target_tokenizer(tokenizer), encoded, settings or BeamSettings(),
                                batch_size=batch_size)
    return [text.strip() for text in outputs]
