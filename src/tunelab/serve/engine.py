"""The engine behind `tunelab serve`: one loaded model, what it can do (from its heads), and every inference
call the routes make. Routes never touch the model; they call the engine, which reuses the code of
`tunelab generate`, `embed`, `fill-mask` and `predict` (tunelab.generate, tunelab.train.tasks, tunelab.data).

Concurrent requests are batched (serve/batching.py): the inputs of single-pass tasks (classify, tag, embeddings,
fill-mask, answer) that arrive within a few milliseconds run in one padded forward pass, and a Transformer
decoder's chat and completion requests share one continuously batched decoding loop (each with its own KV cache
rows and settings). The model still runs one forward pass at a time (a lock): on a CPU, two passes at once only
fight over the cores. Recurrent language models and encoder-decoders (beam search) run one request at a time.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterator, Sequence

from tunelab.generate.decode import Completion, Generation, GenerationSettings, max_positions
from tunelab.serve.batching import DecodeScheduler, EncoderBatcher

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

    def __init__(self, model, tokenizer, name: str, *, max_input_tokens: int | None = None, max_batch: int = 32,
                 batch_wait_ms: float = 0.0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.generation: dict = {}  # generation_config.json of the model: seq2seq's beam defaults
        self.lock = threading.Lock()
        self.capabilities = self._capabilities()
        self.max_input_tokens = self._input_limit(max_input_tokens)
        self.configure_batching(max_batch=max_batch, batch_wait_ms=batch_wait_ms)

    def configure_batching(self, *, max_batch: int = 32, batch_wait_ms: float = 0.0) -> None:
        """max_batch: the most inputs in one encoder forward pass and the most sequences decoded together;
        batch_wait_ms: how long the first request of a batch waits for others (0: a batch takes the requests that
        queued while the model was busy, and a lone request runs at once). Call before serving."""
        self.max_batch, self.batch_wait = max(1, max_batch), max(0.0, batch_wait_ms) / 1000
        self._batchers: dict[str, EncoderBatcher] = {}
        self.decoder: DecodeScheduler | None = None
        if "completions" in self.capabilities and not self.model.is_recurrent:
            self.decoder = DecodeScheduler(self.model, self.tokenizer, self.lock, max_batch=self.max_batch,
                                           wait=self.batch_wait)

    def _batched(self, task: str, run: Callable[[Hashable, list], list]) -> EncoderBatcher:
        """The dynamic batcher of `task` (made on first use), calling `run(key, inputs)`."""
        if task not in self._batchers:
            self._batchers[task] = EncoderBatcher(run, self.lock, max_batch=self.max_batch, wait=self.batch_wait,
                                                  name=task)
        return self._batchers[task]

    def batches(self) -> dict[str, int]:
        """Batches run so far per task ("generate": prefills and decoding steps)."""
        counts = {task: b.passes for task, b in self._batchers.items()}
        if self.decoder is not None:
            counts["generate"] = self.decoder.steps
        return counts

    def batch_metrics(self) -> list[str]:
        """Prometheus lines on batching: batches run per task; requests decoding and waiting."""
        lines = ["# HELP tunelab_batches_total Batches run, by task (generate: prefills and decoding steps).",
                 "# TYPE tunelab_batches_total counter"]
        lines += [f'tunelab_batches_total{{task="{t}"}} {n}' for t, n in sorted(self.batches().items())]
        if self.decoder is not None:
            stats = self.decoder.stats()
            lines += ["# HELP tunelab_decode_requests Generation requests in the running batch and waiting for it.",
                      "# TYPE tunelab_decode_requests gauge",
                      f'tunelab_decode_requests{{state="running"}} {stats["running"]}',
                      f'tunelab_decode_requests{{state="waiting"}} {stats["waiting"]}']
        return lines

    @classmethod
    def load(cls, source: str, *, name: str | None = None, dtype: str | None = None,
             max_input_tokens: int | None = None) -> "Engine":
        """Any model source: a run directory, an HF directory, a GGUF file or a registered name. The served
        name defaults to the registered name or the file / directory name."""
        from tunelab.train.run import load_any

        from tunelab.checkpoint.load import generation_defaults

        model, tokenizer = load_any(source, dtype=dtype)
        engine = cls(model, tokenizer, name or default_name(source), max_input_tokens=max_input_tokens)
        engine.generation = generation_defaults(source)
        return engine

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
        """Decode prompts to the end (in the running batch with other requests' prompts)."""
        completions: list[Completion] = []
        for item in self.stream(prompts, settings):
            if item and isinstance(item[0], Completion):
                completions = item
        return completions

    def stream(self, prompts: list[list[int]], settings: GenerationSettings,
               cancelled: threading.Event | None = None) -> Iterator[list[str] | list[Completion]]:
        """Yield each step's new text of every prompt, then (last) the list of Completions. The prompts join the
        running batch; they leave it when `cancelled` is set (the client went away) or this iterator is closed."""
        if self.decoder is None:
            yield from self._serial_stream(prompts, settings, cancelled)
            return
        submission = self.decoder.submit(prompts, settings, cancelled)
        try:
            yield from submission
        finally:
            submission.cancel()  # a no-op once it has ended

    def _serial_stream(self, prompts, settings, cancelled) -> Iterator[list[str] | list[Completion]]:
        """Recurrent models: one request at a time, holding the model for the whole generation."""
        with self.lock:
            generation = Generation(self.model, self.tokenizer, prompts, settings)
            for pieces in generation:
                if cancelled is not None and cancelled.is_set():
                    return
                yield pieces
        yield generation.completions

    # ------------------------------------------------------------------------------------------ encoders

    # Each task checks a request's inputs here, in the request's thread, then hands them to its batcher; the
    # batcher's worker runs `_<task>_batch(key, inputs of several requests)`: one pass, or passes of max_batch
    # inputs when one request alone brings more.

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.require("embeddings")
        return self._batched("embeddings", self._embed_batch)(texts)

    def _embed_batch(self, _, texts: list[str]) -> list[list[float]]:
        from tunelab.generate.encoders import embed

        return embed(self.model, self.tokenizer, texts, batch_size=self.max_batch).tolist()

    def count_tokens(self, texts: Sequence[str]) -> int:
        return sum(len(self.tokenizer.encode(t)) for t in texts)

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        """{"label", "score", "scores"} per text (or text pair), as `tunelab predict` writes them."""
        from tunelab.data.classification import ClassificationExample, encode_classification

        self.require("classify")
        examples = [ClassificationExample(t, pairs[i] if pairs else None, None, f"input[{i}]")
                    for i, t in enumerate(texts)]
        features = encode_classification(examples, self.tokenizer, self.max_input_tokens or 512).features
        return self._batched("classify", self._classify_batch)(features)

    def _classify_batch(self, _, features: list[dict]) -> list[dict]:
        from tunelab.train.tasks import ClassificationStep

        step = ClassificationStep(self._labels("classifier"), self._pad_id())
        return step.predict(self.model, features, self.max_batch, _no_autocast)

    def tag(self, sentences: list[list[str]]) -> list[list[str]]:
        """One tag per word of every sentence (words given, or the text split on white space)."""
        from tunelab.data.tagging import TaggingExample, encode_tagging

        self.require("tag")
        examples = [TaggingExample(words, None, f"input[{i}]") for i, words in enumerate(sentences)]
        features = encode_tagging(examples, self.tokenizer, self._labels("tagger"),
                                  self.max_input_tokens or 512).features
        return self._batched("tag", self._tag_batch)(features)

    def _tag_batch(self, _, features: list[dict]) -> list[list[str]]:
        from tunelab.train.tasks import TaggingStep

        step = TaggingStep(self._labels("tagger"), pad_token_id=self._pad_id())
        return step.predict(self.model, features, self.max_batch, _no_autocast)

    def answer(self, questions: list[tuple[str, str]], *, max_answer_length: int = 30) -> list[Answer]:
        """Extractive QA: the best span of each context for its question, over overlapping windows."""
        self.require("answer")
        return self._batched("answer", self._answer_batch)(list(questions), key=max_answer_length)

    def _answer_batch(self, max_answer_length: int, questions: list[tuple[str, str]]) -> list[Answer]:
        from tunelab.data.qa import QAExample, encode_qa_eval
        from tunelab.train.tasks import QAStep

        # a long context makes several overlapping windows (features); one pass runs over all of them
        max_len = min(self.max_input_tokens or 384, 384)
        examples = [QAExample(str(i), q, c, [], "", f"input[{i}]") for i, (q, c) in enumerate(questions)]
        features = encode_qa_eval(examples, self.tokenizer, max_len, min(128, max_len // 2)).features
        step = QAStep(examples, max_answer_length=max_answer_length, pad_token_id=self._pad_id())
        texts = step.answers(self.model, features, self.max_batch, _no_autocast)
        out = []
        for e in examples:
            text = texts.get(e.id, "")
            out.append(Answer(text, e.context.find(text) if text else -1))
        return out

    def fill_mask(self, text: str, top_k: int = 5):
        self.require("fill-mask")
        ids = self.tokenizer.encode(text)
        self._check_length(len(ids), "the input")
        if self.tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token")
        if self.tokenizer.mask_token_id not in ids:
            raise ValueError(f"the text has no {self.tokenizer.mask_token} token")
        return self._batched("fill-mask", self._fill_mask_batch)([text], key=top_k)[0]

    def _fill_mask_batch(self, top_k: int, texts: list[str]):
        from tunelab.generate.encoders import fill_masks

        return fill_masks(self.model, self.tokenizer, texts, top_k=top_k)

    def seq2seq(self, texts: list[str], *, max_new_tokens: int | None = None, beam_size: int | None = None) -> list[str]:
        """Translate or summarize (whatever the encoder-decoder was trained for) with beam search."""
        from tunelab.generate.beam import BeamSettings, seq2seq_generate

        self.require("seq2seq")
        defaults, trained = BeamSettings(), self.generation  # the run's task.generation, as `tunelab predict`
        settings = BeamSettings(beam_size=beam_size or trained.get("num_beams") or defaults.beam_size,
                                length_penalty=trained.get("length_penalty", defaults.length_penalty),
                                max_new_tokens=max_new_tokens or trained.get("max_new_tokens") or defaults.max_new_tokens)
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
