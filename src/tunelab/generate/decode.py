"""Autoregressive decoding with a KV cache (or a recurrent model's state), batched over left-padded prompts,
streamed as text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from tunelab.generate.sampling import next_tokens
from tunelab.generate.stopping import StopStringFilter
from tunelab.models.base import Model


@dataclass
class GenerationSettings:
    """How to decode. temperature 0 is greedy; seed makes sampling repeatable."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_token_ids: list[int] | None = None  # None: the model's and tokenizer's EOS

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int


def eos_ids(model: Model, tokenizer=None) -> set[int]:
    """End-of-sequence ids from the model config and the tokenizer."""
    ids: set[int] = set()
    eos = model.config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def max_positions(model: Model) -> int | None:
    """The longest sequence a model with learned positions can take (None: rotary, no hard limit)."""
    if model.family == "gpt2":
        return model.config.max_position_embeddings
    return None


@torch.inference_mode()
def decode_tokens(
    model: Model, prompts: list[list[int]], settings: GenerationSettings, stop_ids: set[int]
) -> Iterator[list[int | None]]:
    """Yield, at each step, the new token id of every row (None for rows that already ended at EOS)."""
    if not model.is_decoder or "lm" not in model.heads:
        raise TypeError(f"this {model.family} model has no language-model head; it cannot generate")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    param = next(model.parameters())
    device = param.device
    B, T = len(prompts), max(len(p) for p in prompts)
    steps = settings.max_new_tokens
    limit = max_positions(model)
    if limit is not None:
        if T > limit:
            raise ValueError(f"the prompt has {T} tokens; this model takes at most {limit}")
        steps = min(steps, limit - T)
    if steps == 0:
        return
    # Left padding, so every row's next token sits in the last column.
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, T - len(prompt):] = torch.tensor(prompt, device=device)
        mask[row, T - len(prompt):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
    recurrent = model.is_recurrent
    cache = None if recurrent else model.new_cache(B, T + steps)
    state = None  # a recurrent model's state: after the prompt (each row's last real token), then each new token
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    lm_head = model.heads["lm"]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(steps):
        if recurrent:
            out = model(ids, mask, state=state, heads=())
            hidden, state = out.hidden, out.state  # [B, t, D]
        else:
            hidden = model(ids, mask, position_ids=positions, cache=cache, heads=()).hidden  # [B, t, D]
        logits = lm_head(hidden[:, -1])  # [B, V]: the head runs on the last position only
        new = next_tokens(
            logits, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, generator=generator
        )  # [B]
        yield [None if d else t for d, t in zip(done.tolist(), new.tolist())]
        done |= torch.tensor([t in stop_ids for t in new.tolist()], device=device)
        if bool(done.all()):
            return
        ids = new[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)


class TextStreams:
    """The text side of decoding n rows: feed each step's token ids, get each row's new text. Tokens are
    detokenised incrementally; a row ends at an EOS id or a stop string (whose text is never shown). Shared by
    `Generation` and the continuous batch of `tunelab.generate.batch`, so both produce the same text."""

    def __init__(self, tokenizer, n: int, stop: list[str], stop_ids: set[int]) -> None:
        self.stop_ids = stop_ids
        self.decoders = [tokenizer.stream_decoder(skip_special_tokens=True) for _ in range(n)]
        self.filters = [StopStringFilter(stop) for _ in range(n)]
        self.texts = [""] * n
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.reasons = ["length"] * n

    @property
    def finished(self) -> bool:
        """Every row has ended (EOS or a stop string)."""
        return all(r == "stop" for r in self.reasons)

    def feed(self, step: list[int | None]) -> list[str]:
        """The new text of every row after this step's tokens (None: the row already ended)."""
        pieces = [""] * len(step)
        for row, token in enumerate(step):
            f = self.filters[row]
            if token is None or f.stopped or self.reasons[row] == "stop":
                continue
            if token in self.stop_ids:
                self.reasons[row] = "stop"
                pieces[row] = f.feed(self.decoders[row].flush()) + f.flush()
            else:
                self.tokens[row].append(token)
                pieces[row] = f.feed(self.decoders[row].add(token))
                if f.stopped:
                    self.reasons[row] = "stop"
            self.texts[row] += pieces[row]
        return pieces

    def finish(self) -> list[str]:
        """The held-back text of every row still running (decoding stopped at its length limit)."""
        tail = ["" if self.reasons[row] == "stop" else self.filters[row].feed(self.decoders[row].flush())
                + self.filters[row].flush() for row in range(len(self.reasons))]
        for row, piece in enumerate(tail):
            self.texts[row] += piece
        return tail

    def completions(self, prompts: list[list[int]]) -> list[Completion]:
        return [Completion(self.texts[row], self.tokens[row], self.reasons[row], len(prompts[row]))
                for row in range(len(self.reasons))]


def stop_ids_of(model: Model, tokenizer, settings: GenerationSettings) -> set[int]:
    """The token ids that end a row: the settings' own, else the model's and tokenizer's EOS."""
    if settings.eos_token_ids is not None:
        return set(settings.eos_token_ids)
    return eos_ids(model, tokenizer)


class Generation:
    """Decode `prompts` and stream their text: iterate to get, each step, the new text of every row;
    `completions` holds the finished results once iteration ends."""

    def __init__(self, model: Model, tokenizer, prompts: list[list[int]], settings: GenerationSettings) -> None:
        self.model, self.tokenizer, self.prompts, self.settings = model, tokenizer, prompts, settings
        self.completions: list[Completion] = []

    def __iter__(self) -> Iterator[list[str]]:
        stop_ids = stop_ids_of(self.model, self.tokenizer, self.settings)
        streams = TextStreams(self.tokenizer, len(self.prompts), self.settings.stop, stop_ids)
        for step in decode_tokens(self.model, self.prompts, self.settings, stop_ids):
            pieces = streams.feed(step)
            if any(pieces):
                yield pieces
            if streams.finished:
                break
        tail = streams.finish()
        if any(tail):
            yield tail
        self.completions = streams.completions(self.prompts)


def generate(model: Model, tokenizer, prompts: list[list[int]], settings: GenerationSettings) -> list[Completion]:
    """Decode every prompt to the end and return the completions."""
    generation = Generation(model, tokenizer, prompts, settings)
    for _ in generation:
        pass
    return generation.completions


def encode_prompt(tokenizer, text: str, *, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of a prompt: plain text with the tokenizer's special tokens, or one user turn rendered
    with the model's chat template and the assistant's turn opened."""
    if not chat:
        return tokenizer.encode(text)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
