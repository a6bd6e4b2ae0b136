"""A model's outputs for examples, by task: what `tunelab predict` computes, for feedback collection.

- classification: the most probable label (and its probability), with the task's ClassificationStep;
- tagging: a tag per word, with the TaggingStep; the output text is the tags joined by spaces;
- chat: the answer to each prompt, rendered with the model's chat template (a model without one reads a plain
  "Human: / Assistant:" transcript), greedy with a KV cache in batches of similar length (beam search with
  beam_size > 1);
- seq2seq: the decoded target of each source, with beam search (greedy with beam_size 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.feedback.examples import Example

Autocast = Callable[[], contextlib.AbstractContextManager]


@dataclass
class GenerationOptions:
    """How generated outputs (chat, seq2seq) are decoded: greedy (beam_size 1) or beam search."""

    max_new_tokens: int = 128
    beam_size: int = 1
    length_penalty: float = 0.6

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")


@dataclass
class Output:
    """What the model answered: the text stored as the record's output, and task details."""

    text: str
    label: str | None = None  # classification
    probability: float | None = None  # classification: the label's probability
    tags: list[str] | None = None  # tagging: one tag per word
    cut_off: bool = False  # generation stopped at max_new_tokens
    metadata: dict[str, Any] = field(default_factory=dict)


def autocast_for(model, precision: str = "auto") -> Autocast:
    """The autocast context of `precision` (fp32, bf16, fp16, auto) on the model's device, as training uses."""
    from tunelab.train.trainer import autocast_context, resolve_precision

    device = next(model.parameters()).device
    return autocast_context(resolve_precision(precision, device), device)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


class OutputMaker:
    """Runs one model over examples of one task; `outputs(examples)` returns one Output per example."""

    def __init__(self, model, tokenizer, task: str, *, labels: Sequence[str] | None = None, max_length: int = 512,
                 batch_size: int = 8, generation: GenerationOptions | None = None, precision: str = "auto",
                 context_tokens: int = 0) -> None:
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.labels = list(labels or [])
        self.max_length = max_length
        self.batch_size = batch_size
        self.generation = generation or GenerationOptions()
        self.autocast = autocast_for(model, precision)
        self.context_tokens = context_tokens
        if task in ("classification", "tagging") and not self.labels:
            raise ValueError(f"a {task} model needs its label names (model.config.labels)")

    def outputs(self, examples: Sequence[Example]) -> list[Output]:
        if not examples:
            return []
        return getattr(self, f"_{self.task}")(list(examples))

    def _classification(self, examples: list[Example]) -> list[Output]:
        from tunelab.data.classification import ClassificationExample, encode_classification
        from tunelab.train.tasks import ClassificationStep

        items = [ClassificationExample(e.prompt_text, e.text_pair, None, e.where) for e in examples]
        features = encode_classification(items, self.tokenizer, self.max_length).features
        step = ClassificationStep(self.labels, pad_id(self.tokenizer))
        predictions = step.predict(self.model, features, self.batch_size, self.autocast)
        return [Output(p["label"], label=p["label"], probability=p["score"], metadata={"scores": p["scores"]})
                for p in predictions]

    def _tagging(self, examples: list[Example]) -> list[Output]:
        from tunelab.data.tagging import TaggingExample, encode_tagging
        from tunelab.train.tasks import TaggingStep

        items = [TaggingExample(list(e.tokens or e.prompt_text.split()), None, e.where) for e in examples]
        features = encode_tagging(items, self.tokenizer, self.labels, self.max_length,
                                  context_tokens=self.context_tokens).features
        step = TaggingStep(self.labels, pad_token_id=pad_id(self.tokenizer))
        predictions = step.predict(self.model, features, self.batch_size, self.autocast)
        return [Output(" ".join(tags), tags=list(tags)) for tags in predictions]

    def _chat(self, examples: list[Example]) -> list[Output]:
        prompts = [chat_prompt(self.tokenizer, e.messages, self.max_length) for e in examples]
        return generate_texts(self.model, self.tokenizer, prompts, self.generation, self.batch_size, self.autocast)

    def _seq2seq(self, examples: list[Example]) -> list[Output]:
        from tunelab.data.seq2seq import TextPair, encode_seq2seq
        from tunelab.generate.beam import BeamSettings
        from tunelab.train.tasks import Seq2SeqStep

        g = self.generation
        pairs = [TextPair(e.prompt_text, None, e.where) for e in examples]
        features = encode_seq2seq(pairs, self.tokenizer, self.max_length, self.max_length).features
        step = Seq2SeqStep(self.tokenizer, settings=BeamSettings(beam_size=g.beam_size, length_penalty=g.length_penalty,
                                                                  max_new_tokens=g.max_new_tokens))
        texts = step.predict(self.model, [{"input_ids": f["input_ids"]} for f in features], self.batch_size,
                             self.autocast)
        return [Output(text) for text in texts]


def chat_prompt(tokenizer, messages: list[dict[str, str]], max_length: int | None = None, *,
                prefill: str = "") -> list[int]:
    """Token ids of a conversation with the assistant's turn opened (and `prefill`, the start of its answer):
    the model's chat template, or a plain transcript ("\\n\\nHuman: ...\\n\\nAssistant:") without one. A prompt
    longer than `max_length` keeps its last tokens."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        from tunelab.data.preference import PLAIN_TRANSCRIPT_TEMPLATE
        from tunelab.tokenizer.chat import render_chat_template

        text = render_chat_template(PLAIN_TRANSCRIPT_TEMPLATE, messages, add_generation_prompt=True)
    ids = tokenizer.encode(text + prefill, add_special_tokens=False)
    return ids[-max_length:] if max_length is not None and len(ids) > max_length else ids


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: list[list[int]], options: GenerationOptions, batch_size: int,
                   autocast: Autocast | None = None) -> list[Output]:
    """A decoder's answers to token-id prompts, in prompt order: greedy with a KV cache in batches of similar
    length, or beam search (options.beam_size > 1)."""
    from tunelab.generate.decode import GenerationSettings, eos_ids, generate

    context = autocast or contextlib.nullcontext
    model.eval()
    if options.beam_size > 1:
        from tunelab.generate.beam import BeamSettings, beam_search_texts

        settings = BeamSettings(beam_size=options.beam_size, length_penalty=options.length_penalty,
                                max_new_tokens=options.max_new_tokens)
        texts = beam_search_texts(model, tokenizer, prompts, settings, batch_size=batch_size, autocast=context,
                                  eos_token_ids=eos_ids(model, tokenizer))
        return [Output(text.strip()) for text in texts]
    settings = GenerationSettings(max_new_tokens=options.max_new_tokens, temperature=0.0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[Output | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        with context():
            completions = generate(model, tokenizer, [prompts[i] for i in chunk], settings)
        for i, completion in zip(chunk, completions):
            outputs[i] = Output(completion.text.strip(), cut_off=completion.finish_reason == "length")
    return outputs  # type: ignore[return-value]
