"""Text samples while a language model trains: at each evaluation, continue a few prompts and log the text.

Seeing "ROMEO:" continued with gibberish at step 0 and with verse-shaped text later says more about a
language model than its loss does. Each sample is printed, appended to run_dir/samples.jsonl
({"step", "prompt", "text"}) and written to TensorBoard as text (tag samples/<i>). Sampling uses its own
seeded random generator, so the same prompt is sampled the same way at every step (the samples of
successive evaluations are comparable) and the training's random state is untouched (exact resume).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from tunelab.generate import GenerationSettings, encode_prompt, generate

SAMPLES_FILE = "samples.jsonl"


class TextSamples:
    """Callable as the Trainer's on_evaluate(step, metrics): generates, prints and logs one sample per prompt."""

    def __init__(self, model, tokenizer, prompts: list[str], run_dir: str | Path, *, max_new_tokens: int = 200,
                 temperature: float = 0.8, seed: int = 0, echo: Callable[[str], None] = print,
                 tensorboard: bool = True) -> None:
        self.model, self.tokenizer, self.prompts = model, tokenizer, list(prompts)
        self.encoded = [encode_prompt(tokenizer, prompt) for prompt in self.prompts]
        for prompt, ids in zip(self.prompts, self.encoded):
            if not ids:
                raise ValueError(f"sample prompt {prompt!r} encodes to no tokens")
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        self.log = SampleLog(run_dir, echo=echo, tensorboard=tensorboard)

    def __call__(self, step: int, metrics: dict | None = None) -> list[dict]:
        was_training = self.model.training
        self.model.eval()
        try:
            completions = generate(self.model, self.tokenizer, self.encoded, self.settings)
        finally:
            self.model.train(was_training)
        records = [{"step": step, "prompt": prompt, "text": c.text} for prompt, c in zip(self.prompts, completions)]
        loss = f", validation loss {metrics['loss']:.4f}" if metrics and isinstance(metrics.get("loss"), float) else ""
        self.log.write(step, records, about=loss)
        return records

    def close(self) -> None:
        self.log.close()


class SampleLog:
    """Where samples go: appended to run_dir/samples.jsonl, printed, and written to TensorBoard's Text tab (tag
    samples/<i>). A task's sample callback makes the records; this writes them."""

    def __init__(self, run_dir: str | Path, *, echo: Callable[[str], None] = print, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / SAMPLES_FILE
        self.echo = echo
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self._tb = None

    def write(self, step: int, records: list[dict], *, about: str = "",
              notes: list[tuple[str, str]] | None = None) -> None:
        """records: {"step", "prompt", "text", ...}; about: added to each printed heading; notes: per record, a
        line printed after its text and one added below it in TensorBoard."""
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        for i, record in enumerate(records):
            printed, shown = notes[i] if notes else ("", "")
            self.echo(f"--- sample {i + 1} at step {step}{about} ---\n{record['prompt']}{record['text']}"
                      + (f"\n{printed}" if printed else ""))
            if self._tb is not None:
                # Markdown: a fenced block keeps the newlines and spaces of the text
                self._tb.add_text(f"samples/{i}", f"```\n{record['prompt']}{record['text']}\n```"
                                  + (f"\n{shown}" if shown else ""), step)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_samples(path: str | Path) -> list[dict]:
    """The records of a samples.jsonl file (a half-written last line is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def last_samples_markdown(path: str | Path) -> list[tuple[str, str]]:
    """The report section of the last step's samples: [(heading, Markdown body)], or [] when there are none."""
    records = read_samples(path)
    if not records:
        return []
    step = records[-1]["step"]
    last = [r for r in records if r["step"] == step]
    body = "\n\n".join(f"```text\n{r['prompt']}{r['text']}\n```" + _judged(r) for r in last)
    return [(f"Samples at step {step}", body)]


def _judged(record: dict) -> str:
    """GRPO's samples carry their reward and success: a line under the text."""
    if "reward" not in record:
        return ""
    return f"\n\nreward {record['reward']:.3f}" + (", success" if record.get("success") else ", no success")
