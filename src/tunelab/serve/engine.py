"""The engine behind `tunelab serve`: one loaded model, what it can do (from its heads), and every inference
call the routes make. Routes never touch the model; they call the engine, which reuses the code of
`tunelab generate`, `embed`, `fill-mask` and `predict` (tunelab.generate, tunelab.train.tasks, tunelab.data).

The model runs one call at a time (a lock): on a CPU, two forward passes at once only fight over the cores.
Concurrent requests wait for it; they are not yet merged into one forward pass (dynamic batching is to come).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from tunelab.generate.decode import Completion, Generation, GenerationSettings, max_positions

# what a model can be asked to do (Engine.capabilities is a subset)
CAPABILITIES = ("chat", "completions", "embeddings", "classify", "tag", "answer", "fill-mask", "seq2seq")


class UnsupportedTask(ValueError):
    """The model cannot do what a request asks (e.g. chat with an encoder)."""


class InputTooLong(ValueError):
    """A prompt or input longer than the model or the server's limit takes."""


@dataclass
class Answer:
    text: str
    start: int  # character offset of the answer in the context (-1: no answer)


def _no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class Engine:
    """A loaded model and tokenizer under a public name, with one method per capability."""

    def __init__(self, model, tokenizer, name: str, *, max_input_tokens: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.lock = threading.Lock()
        self.capabilities = self._capabilities()
        self.max_input_tokens = self._input_limit(max_input_tokens)

    @classmethod
    def load(cls, source: str, *, name: str | None = None, dtype: str | None = None,
             max_input_tokens: int | None = None) -> "Engine":
        """Any model source: a run directory, an HF directory, a GGUF file or a registered name. The served
        name defaults to the registered name or the file / directory name."""
        from tunelab.train.run import load_any

        model, tokenizer = load_any(source, dtype=dtype)
        return cls(model, tokenizer, name or default_name(source), max_input_tokens=max_input_tokens)

    # ------------------------------------------------------------------------------------------ capabilities

    def _capabilities(self) -> list[str]:
        m, heads = self.model, self.model.heads
        caps = []
        if m.is_encoder_decoder:
            return ["seq2seq"]
        if m.is_decoder and "lm" in heads:
            caps.append("completions")
            if getattr(self.tokenizer, "chat_template", None):
                caps.append("chat")
        if not m.is_decoder and not m.is_recurrent:
            caps.append("embeddings")
        for head, cap in (("classifier", "classify"), ("tagger", "tag"), ("qa", "answer"), ("mlm", "fill-mask")):
            if head in heads:
                caps.append(cap)
        return caps

    def _input_limit(self, limit: int | None) -> int | None:
        """The longest input in tokens: the model's learned positions, the tokenizer's limit, the server's."""
        candidates = [limit, getattr(self.tokenizer, "model_max_length", None)]
        if self.model.is_decoder:
            candidates.append(max_positions(self.model))
        else:
            candidates.append(getattr(self.model.config, "max_position_embeddings", None))
        values = [c for c in candidates if isinstance(c, int) and 0 < c < 10**8]
        return min(values) if values else None

    def require(self, capability: str) -> None:
        if capability not in self.capabilities:
            can = ", ".join(self.capabilities) or "nothing"
            raise UnsupportedTask(f"the model '{self.name}' ({self.model.family}, heads: "
                                  f"{', '.join(self.model.heads) or 'none'}) cannot do {capability}; it can do: {can}")

    def _check_length(self, n_tokens: int, what: str = "the prompt") -> None:
        if self.max_input_tokens is not None and n_tokens > self.max_input_tokens:
            raise InputTooLong(f"{what} has {n_tokens} tokens; this server takes at most {self.max_input_tokens}")

    # ------------------------------------------------------------------------------------------ decoders

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation rendered with the model's own chat template, the assistant's turn opened."""
        self.require("chat")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        self._check_length(len(ids))
        return ids

    def text_prompt(self, text: str) -> list[int]:
        self.require("completions")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ValueError("the prompt is empty")
        self._check_length(len(ids))
        return ids

    def generate(self, prompts: list[list[int]], settings: GenerationSettings) -> list[Completion]:
        """Decode prompts together (left-padded, one KV cache) to the end."""
        with self.lock:
            generation = Generation(self.model, self.tokenizer, prompts, settings)
            for _ in generation:
                pass
        return generation.completions

    def stream(self, prompts: list[list[int]], settings: GenerationSettings,
               cancelled: threading.Event | None = None) -> Iterator[list[str] | list[Completion]]:
        """Yield each step's new text of every prompt, then (last) the list of Completions. Holds the model
        for the whole generation; stops early when `cancelled` is set (the client went away)."""
        with self.lock:
            generation = Generation(self.model, self.tokenizer, prompts, settings)
            for pieces in generation:
                if cancelled is not None and cancelled.is_set():
                    return
                yield pieces
        yield generation.completions

    # ------------------------------------------------------------------------------------------ encoders

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> list[list[float]]:
        from tunelab.generate.encoders import embed

        self.require("embeddings")
        with self.lock:
            return embed(self.model, self.tokenizer, texts).tolist()

    def count_tokens(self, texts: Sequence[str]) -> int:
        return sum(len(self.tokenizer.encode(t)) for t in texts)

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        """{"label", "score", "scores"} per text (or text pair), as `tunelab predict` writes them."""
        from tunelab.data.classification import ClassificationExample, encode_classification
        from tunelab.train.tasks import ClassificationStep

        self.require("classify")
        labels = self._labels("classifier")
        examples = [ClassificationExample(t, pairs[i] if pairs else None, None, f"input[{i}]")
                    for i, t in enumerate(texts)]
        features = encode_classification(examples, self.tokenizer, self.max_input_tokens or 512).features
        with self.lock:
            return ClassificationStep(labels, self._pad_id()).predict(self.model, features, 32, _no_autocast)

    def tag(self, sentences: list[list[str]]) -> list[list[str]]:
        """One tag per word of every sentence (words given, or the text split on white space)."""
        from tunelab.data.tagging import TaggingExample, encode_tagging
        from tunelab.train.tasks import TaggingStep

        self.require("tag")
        labels = self._labels("tagger")
        examples = [TaggingExample(words, None, f"input[{i}]") for i, words in enumerate(sentences)]
        features = encode_tagging(examples, self.tokenizer, labels, self.max_input_tokens or 512).features
        with self.lock:
            return TaggingStep(labels, pad_token_id=self._pad_id()).predict(self.model, features, 32, _no_autocast)

    def answer(self, questions: list[tuple[str, str]], *, max_answer_length: int = 30) -> list[Answer]:
        """Extractive QA: the best span of each context for its question, over overlapping windows."""
        from tunelab.data.qa import QAExample, encode_qa_eval
        from tunelab.train.tasks import QAStep

        self.require("answer")
        examples = [QAExample(str(i), q, c, [], "", f"input[{i}]") for i, (q, c) in enumerate(questions)]
        max_len = min(self.max_input_tokens or 384, 384)
        features = encode_qa_eval(examples, self.tokenizer, max_len, min(128, max_len // 2)).features
        step = QAStep(examples, max_answer_length=max_answer_length, pad_token_id=self._pad_id())
        with self.lock:
            texts = step.answers(self.model, features, 32, _no_autocast)
        out = []
        for e in examples:
            text = texts.get(e.id, "")
            out.append(Answer(text, e.context.find(text) if text else -1))
        return out

    def fill_mask(self, text: str, top_k: int = 5):
        from tunelab.generate.encoders import fill_mask

        self.require("fill-mask")
        self._check_length(len(self.tokenizer.encode(text)), "the input")
        with self.lock:
            return fill_mask(self.model, self.tokenizer, text, top_k=top_k)

    def seq2seq(self, texts: list[str], *, max_new_tokens: int | None = None, beam_size: int | None = None) -> list[str]:
        """Translate or summarize (whatever the encoder-decoder was trained for) with beam search."""
        from tunelab.generate.beam import BeamSettings, seq2seq_generate

        self.require("seq2seq")
        defaults = BeamSettings()
        settings = BeamSettings(beam_size=beam_size or defaults.beam_size,
                                length_penalty=defaults.length_penalty,
                                max_new_tokens=max_new_tokens or defaults.max_new_tokens)
        with self.lock:
            return [t.strip() for t in seq2seq_generate(self.model, self.tokenizer, texts, settings)]

    # ------------------------------------------------------------------------------------------ helpers

    def _labels(self, head: str) -> list[str]:
        labels = list(self.model.config.labels or [])
        if not labels:
            module = self.model.heads[head]
            size = module.out.out_features if hasattr(module, "out") else module.weight.shape[0]
            labels = [str(i) for i in range(size)]
        return labels

    def _pad_id(self) -> int:
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else (t.eos_token_id or 0)


def default_name(source: str) -> str:
    """The public model name of a source: a registered name as it is, else the last path component."""
    path = Path(source).expanduser()
    if not path.exists():
        return source
    name = path.resolve().name
    return name[:-5] if name.endswith(".gguf") else name
