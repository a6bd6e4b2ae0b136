"""Judges of model outputs: each turns (example, output) pairs into verdicts, scores, critiques, corrections.

- `GoldJudge` (source "gold"): against the data's gold answer. Classification: a wrong label is bad and its
  correction is the gold label. Tagging: a sentence whose entity spans differ from the gold ones is bad, its
  correction the gold tags, its critique names each wrong span, its score the sentence's span F1.
  Generation: sentence BLEU or chrF (0-100, default for seq2seq: BLEU) or ROUGE-L (0-1, default for chat)
  is the score; below the threshold is bad, with the reference as the correction.
- `VerifierJudge` (source "rule"): a Python function named "module:function" (evaluate/verifiers.py).
- `RewardModelJudge` (source "reward_model"): the scalar reward of a run trained with task reward_model;
  a verdict only with a threshold.
- `ModelJudge` (source "judge"): a chat model prompted with a rubric; its reply is parsed by
  `parse_judge_reply` ("Verdict: good|bad", "Critique: ...", "Score: 7/10"); a reply without a verdict or a
  score gives no judgement (collect.py reports it and stores nothing for it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.schema import CollectJudgeSection
from tunelab.errors import ConfigError, DataError, FeedbackError
from tunelab.feedback.examples import Example
from tunelab.feedback.outputs import GenerationOptions, Output, autocast_for, chat_prompt, generate_texts

# gold judge of generated text: the metric per task, and the value below which an output is bad
DEFAULT_METRIC = {"seq2seq": "bleu", "chat": "rouge"}
DEFAULT_THRESHOLD = {"bleu": 20.0, "chrf": 40.0, "rouge": 0.3}
METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF", "rouge": "ROUGE-L"}

ModelLoader = Callable[[str], tuple[Any, Any]]


@dataclass
class Verdict:
    """One judge's judgement of one output. Neither verdict nor score: no judgement (a reply not understood)."""

    verdict: str | None = None
    score: float | None = None
    critique: str | None = None
    correction: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def judged(self) -> bool:
        return self.verdict is not None or self.score is not None


class Judge:
    """A judge: `name` identifies it in records (metadata["judge"]) and summaries; `source` is the records' source."""

    name: str = ""
    source: str = ""
    needs_reference: bool = False  # every example must have its gold answer

    def __call__(self, examples: Sequence[Example], outputs: Sequence[Output], task: str) -> list[Verdict]:
        raise NotImplementedError


def _by_threshold(score: float | None, threshold: float | None) -> str | None:
    if score is None or threshold is None:
        return None
    return "good" if score >= threshold else "bad"


# ---------------------------------------------------------------------------------------------- gold


class GoldJudge(Judge):
    """Against the gold answers of the data (see the module docstring)."""

    source, needs_reference = "gold", True

    def __init__(self, metric: str | None = None, threshold: float | None = None) -> None:
        self.metric, self.threshold = metric, threshold
        self.name = "gold" if metric is None else f"gold:{metric}"

    def __call__(self, examples, outputs, task):
        verdicts = []
        for example, output in zip(examples, outputs):
            if example.reference is None:
                raise DataError(f"{example.where or 'an example'}: the gold judge needs the gold answer "
                                f"(a label, tags or a reference text) and this example has none")
            if task == "classification":
                verdicts.append(self._label(example, output))
            elif task == "tagging":
                verdicts.append(self._tags(example, output))
            else:
                verdicts.append(self._text(example, output, task))
        return verdicts

    def _label(self, example: Example, output: Output) -> Verdict:
        gold = str(example.reference)
        scores = output.metadata.get("scores", {})
        metadata = {"probability": output.probability}
        if gold in scores:
            metadata["gold_probability"] = scores[gold]
        if output.label == gold:
            return Verdict("good", metadata=metadata)
        return Verdict("bad", critique=f"The label is {gold!r}, not {output.label!r}.", correction=gold,
                       metadata=metadata)

    def _tags(self, example: Example, output: Output) -> Verdict:
        from tunelab.evaluate.metrics import tag_entities

        gold, predicted = list(example.reference), list(output.tags or [])
        if len(gold) != len(predicted):
            raise DataError(f"{example.where}: {len(gold)} gold tags but {len(predicted)} predicted ones")
        words = example.tokens or example.prompt_text.split()
        true, found = tag_entities(gold), tag_entities(predicted)
        correct = len(set(true) & set(found))
        f1 = 2 * correct / (len(true) + len(found)) if true or found else 1.0
        if set(true) == set(found):
            return Verdict("good", score=f1)
        return Verdict("bad", score=f1, critique=span_critique(words, true, found), correction=" ".join(gold),
                       metadata={"wrong_spans": len(set(true) ^ set(found))})

    def _text(self, example: Example, output: Output, task: str) -> Verdict:
        from tunelab.evaluate.metrics import sentence_score

        metric = self.metric or DEFAULT_METRIC.get(task, "rouge")
        threshold = self.threshold if self.threshold is not None else DEFAULT_THRESHOLD[metric]
        reference = example.reference if isinstance(example.reference, (str, list)) else str(example.reference)
        score = sentence_score(metric, output.text, reference)
        shown = f"{score:.1f}" if metric in ("bleu", "chrf") else f"{score:.3f}"
        if score >= threshold:
            return Verdict("good", score=score, metadata={"metric": metric, "threshold": threshold})
        correction = reference if isinstance(reference, str) else str(reference[0])
        return Verdict("bad", score=score, correction=correction,
                       critique=f"{METRIC_NAMES[metric]} against the reference is {shown}, below {threshold:g}.",
                       metadata={"metric": metric, "threshold": threshold})


def span_critique(words: Sequence[str], gold: Sequence[tuple[str, int, int]],
                  predicted: Sequence[tuple[str, int, int]]) -> str:
    """One sentence naming each wrong span: a wrong type, wrong boundaries, a missed entity or a spurious one.
    Spans are (type, first word, last word)."""
    def text(start: int, end: int) -> str:
        return " ".join(words[start : end + 1])

    def in_order(spans: set[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        return sorted(spans, key=lambda s: (s[1], s[2], s[0]))

    gold_set, found_set = set(gold), set(predicted)
    spurious = in_order(found_set - gold_set)
    used: set[tuple[str, int, int]] = set()
    problems = []
    for kind, start, end in in_order(gold_set - found_set):
        same_place = [s for s in spurious if (s[1], s[2]) == (start, end) and s not in used]
        overlapping = [s for s in spurious if s[1] <= end and s[2] >= start and s not in used]
        if same_place:
            used.add(same_place[0])
            problems.append(f"'{text(start, end)}' is {kind}, not {same_place[0][0]}")
        elif overlapping:
            used.update(overlapping)
            shown = " and ".join(f"'{text(s[1], s[2])}' as {s[0]}" for s in overlapping)
            problems.append(f"'{text(start, end)}' is one {kind} entity, tagged {shown}")
        else:
            problems.append(f"missed {kind} '{text(start, end)}'")
    for kind, start, end in [s for s in spurious if s not in used]:
        problems.append(f"'{text(start, end)}' is not an entity but was tagged {kind}")
    return "Wrong spans: " + "; ".join(problems) + "."


# ---------------------------------------------------------------------------------------------- verifiers


class VerifierJudge(Judge):
    """A verifier function `module:function` (or `file.py:function`) called on each output and its data row."""

    source = "rule"

    def __init__(self, spec: str, threshold: float | None = None) -> None:
        from tunelab.evaluate.verifiers import load_verifier

        self.spec, self.threshold = spec, threshold
        self.function = load_verifier(spec)
        self.name = f"verifier:{spec}"

    def __call__(self, examples, outputs, task):
        from tunelab.evaluate.verifiers import judge

        verdicts = []
        for example, output in zip(examples, outputs):
            try:
                judged = judge(self.function, output.text, example.verifier_fields(), name=f"verifier {self.spec}")
            except Exception as error:  # a verifier is the user's code: say where it failed, on which example
                raise FeedbackError(f"{example.where or 'an example'}: verifier {self.spec} failed: "
                                    f"{type(error).__name__}: {error}") from error
            verdict = judged.verdict or _by_threshold(judged.score, self.threshold)
            verdicts.append(Verdict(verdict, judged.score, judged.critique, metadata={"verifier": self.spec}))
        return verdicts


# ---------------------------------------------------------------------------------------------- reward model


class RewardModelJudge(Judge):
    """The scalar reward of a reward model (a run of task reward_model, or a model whose classifier head has one
    output) for prompt + output, encoded as the reward model was trained; a verdict by `threshold` if given."""

    source = "reward_model"

    def __init__(self, source: str, *, threshold: float | None = None, batch_size: int = 8, precision: str = "auto",
                 loader: ModelLoader | None = None) -> None:
        from tunelab.train.run import is_run_dir, load_run

        self.model_source, self.threshold, self.batch_size = source, threshold, batch_size
        self.name = f"reward_model:{source}"
        self.max_length, self.max_prompt_length = 512, None
        if is_run_dir(source):
            model, tokenizer, config = load_run(source)
            if config.task.type != "reward_model":
                raise ConfigError(f"{source}: a run of task {config.task.type}, not a reward model (task reward_model)")
            self.max_length, self.max_prompt_length = config.data.max_length, config.data.max_prompt_length
        else:
            model, tokenizer = (loader or _load)(source)
        if "classifier" not in model.heads or len(model.config.labels or [None]) != 1:
            raise ConfigError(f"{source}: not a reward model: it needs a classifier head with one output (train one "
                              f"with task reward_model)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.autocast = autocast_for(model, precision)

    def __call__(self, examples, outputs, task):
        from tunelab.data.preference import encode_answers
        from tunelab.feedback.outputs import pad_id
        from tunelab.train.preference import RewardModelStep

        features = encode_answers([e.messages for e in examples], [o.text for o in outputs], self.tokenizer,
                                  self.max_length, max_prompt_length=self.max_prompt_length, special_tokens=True)
        rewards = RewardModelStep(pad_id(self.tokenizer)).scores(self.model, features, self.batch_size, self.autocast)
        return [Verdict(_by_threshold(r, self.threshold), r, metadata={"reward_model": self.model_source})
                for r in rewards]


def _load(source: str):
    from tunelab.train.run import load_any

    return load_any(source)


# ---------------------------------------------------------------------------------------------- judge model

DEFAULT_RUBRIC = "correct, helpful and to the point"
# The prompt of a judge model when the rubric is only the criterion. The reply is prefilled with "Verdict:", so
# that even a small model answers with good or bad first (SmolLM2-135M, asked without it, restates the
# criterion or the question instead).
JUDGE_PROMPT = """Judge an assistant's answer by this criterion: {rubric}

Question: {input}
{reference_block}Assistant's answer: {output}

Is the assistant's answer good or bad by the criterion? Answer with good or bad, then one sentence that says why."""
REFERENCE_BLOCK = "Reference answer: {reference}\n"
PREFILL = "Verdict:"
_PLACEHOLDERS = ("{input}", "{output}", "{reference}")


def load_rubric(rubric: str | None) -> str:
    """The rubric text: the default, a file's text (an existing path), or the text itself."""
    if rubric is None:
        return DEFAULT_RUBRIC
    if "\n" not in rubric and len(rubric) < 4096:
        path = Path(rubric).expanduser()
        if path.is_file():
            text = path.read_text(encoding="utf-8").strip()
            if not text:
                raise ConfigError(f"{path}: the rubric file is empty")
            return text
        if path.suffix.lower() in (".txt", ".md", ".j2", ".jinja") and " " not in rubric:
            raise ConfigError(f"{rubric}: no such rubric file")
    if not rubric.strip():
        raise ConfigError("the rubric is empty")
    return rubric.strip()


def judge_prompt(rubric: str, example: Example, output: str) -> tuple[str, str]:
    """(the user message to the judge, the prefill of its reply). A rubric with {input}, {output} or {reference}
    in it is the whole message (the placeholders filled in, no prefill); else it is the criterion of
    JUDGE_PROMPT."""
    reference = example.reference
    if reference is not None and not isinstance(reference, str):
        reference = " ".join(map(str, reference)) if isinstance(reference, list) else str(reference)
    values = {"{input}": _conversation_text(example), "{output}": output, "{reference}": reference or "(none)"}
    if any(p in rubric for p in _PLACEHOLDERS):
        text = rubric
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        return text, ""
    block = REFERENCE_BLOCK.replace("{reference}", reference) if reference else ""
    text = (JUDGE_PROMPT.replace("{rubric}", rubric).replace("{reference_block}", block)
            .replace("{input}", values["{input}"]).replace("{output}", output))
    return text, PREFILL


def _conversation_text(example: Example) -> str:
    turns = [m for m in example.messages if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


class ModelJudge(Judge):
    """A chat model asked, for each output, whether it is good by a rubric; greedy, batched, short replies."""

    source = "judge"

    def __init__(self, source: str, *, rubric: str | None = None, max_new_tokens: int = 64, batch_size: int = 8,
                 precision: str = "auto", max_length: int = 2048, loader: ModelLoader | None = None) -> None:
        self.model_source = source
        self.rubric = load_rubric(rubric)
        self.name = f"judge:{source}"
        self.max_new_tokens, self.batch_size, self.max_length = max_new_tokens, batch_size, max_length
        model, tokenizer = (loader or _load)(source)
        if "lm" not in model.heads or not model.is_decoder:
            raise ConfigError(f"{source}: a judge model generates its verdict: it needs a decoder with a language-"
                              f"model head (a chat model such as smollm2-135m-instruct)")
        self.model, self.tokenizer = model, tokenizer
        self.autocast = autocast_for(model, precision)

    def __call__(self, examples, outputs, task):
        prompts, prefills = [], []
        for example, output in zip(examples, outputs):
            text, prefill = judge_prompt(self.rubric, example, output.text)
            prompts.append(chat_prompt(self.tokenizer, [{"role": "user", "content": text}], self.max_length,
                                       prefill=prefill))
            prefills.append(prefill)
        replies = generate_texts(self.model, self.tokenizer, prompts, GenerationOptions(self.max_new_tokens),
                                 self.batch_size, self.autocast)
        verdicts = []
        for prefill, reply in zip(prefills, replies):
            raw = f"{prefill} {reply.text}" if prefill else reply.text
            parsed = parse_judge_reply(raw)
            parsed.metadata.update(judge_model=self.model_source, judge_reply=raw)
            verdicts.append(parsed)
        return verdicts


# words a judge may give as its verdict
_GOOD = ("good", "pass", "passed", "correct", "acceptable", "yes", "right", "accurate")
_BAD = ("bad", "fail", "failed", "incorrect", "unacceptable", "no", "wrong", "inaccurate", "poor")
_WORD = "|".join(_GOOD + _BAD)
_VERDICT = re.compile(rf"\bverdict\b[\W_]{{0,8}}(not\s+)?({_WORD})\b", re.IGNORECASE)
# "good or bad", "good/bad", "good|bad": the instructions restated, not a verdict
_ECHO = re.compile(rf"\s*(\||/|\bor\b)\s*({_WORD})\b", re.IGNORECASE)
_LEADING = re.compile(rf"^[\W_]*(not\s+)?({_WORD})\b[\W_]*", re.IGNORECASE)
_SCORE = re.compile(r"\b(?:score|rating)\b[\W_]{0,8}(-?\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?",
                    re.IGNORECASE)
# "The answer is (not) correct", "it is not very good", "meets / does not meet the criterion"
_STATEMENT = re.compile(rf"\b(?:answer|response|reply|it)\s+(?:is|was)\s+(not\s+)?(?:(?:very|quite|entirely|fully|"
                        rf"completely|totally|mostly)\s+)?({_WORD})\b", re.IGNORECASE)
_MEETS = re.compile(r"\b(does\s+not\s+meet|doesn't\s+meet|fails\s+to\s+meet|meets)\s+the\s+criteri", re.IGNORECASE)
_CRITIQUE = re.compile(r"\b(?:critique|reason|explanation|because)\b\s*[:\-]?\**\s*(.+)", re.IGNORECASE)
MAX_CRITIQUE = 400


def parse_judge_reply(text: str) -> Verdict:
    """A judge model's verdict, score and critique, read robustly from its reply.

    The verdict: the word after "Verdict" (good / bad and their synonyms: pass / fail, correct / incorrect,
    yes / no, ...; "not good" is bad), skipping a restated "good or bad"; else a reply that starts with such a
    word; else a first sentence that states it ("The answer is not correct.", "It meets the criterion.").
    The score: "Score: 7" or "Score: 7/10" (then 0.7: a fraction of the scale). The critique: the text
    after "Critique:" (or "Reason:", "because"), else the rest of the verdict's line or the next line, to the
    end of its first sentence. Neither a verdict nor a score: no judgement (judged is False).
    """
    verdict, rest = _find_verdict(text)
    score = None
    match = _SCORE.search(text)
    if match:
        value = float(match.group(1))
        scale = float(match.group(2)) if match.group(2) else None
        score = value / scale if scale else value
    critique = None
    match = _CRITIQUE.search(text)
    if match:
        critique = _first_sentence(match.group(1))
    elif rest is not None:
        lines = [line.strip(" \t-*") for line in rest.splitlines() if line.strip(" \t-*")]
        lines = [line for line in lines if not _SCORE.match(line)]
        critique = _first_sentence(lines[0]) if lines else None
    return Verdict(verdict, score, critique or None)


def _find_verdict(text: str) -> tuple[str | None, str | None]:
    """(the verdict, the text after it, where a critique may follow), or (None, None)."""
    for match in _VERDICT.finditer(text):
        if not _ECHO.match(text, match.end()):
            return _verdict_word(match.group(2), bool(match.group(1))), text[match.end():].lstrip(" \t.:-*")
    stripped = text.strip()
    match = _LEADING.match(stripped)
    if match and not _ECHO.match(stripped, match.end(2)):
        return _verdict_word(match.group(2), bool(match.group(1))), stripped[match.end():]
    first = _first_sentence(stripped) or ""
    statement, meets = _STATEMENT.search(first), _MEETS.search(first)
    if statement is None and meets is None:
        return None, None
    if statement is not None:
        verdict = _verdict_word(statement.group(2), bool(statement.group(1)))
    else:
        verdict = "good" if meets.group(1).lower() == "meets" else "bad"
    after = stripped[stripped.find(first) + len(first):].strip()
    return verdict, after if _first_sentence(after) else first


def _verdict_word(word: str, negated: bool) -> str:
    good = word.lower() in _GOOD
    return "good" if good != negated else "bad"


def _first_sentence(text: str) -> str | None:
    text = text.strip().strip("*").strip()
    line = text.splitlines()[0].strip() if text else ""
    match = re.match(r"(.+?[.!?])(\s|$)", line)
    sentence = (match.group(1) if match else line).strip()
    return sentence[:MAX_CRITIQUE] or None


# ---------------------------------------------------------------------------------------------- from config


def make_judge(spec: CollectJudgeSection | Mapping[str, Any] | Judge, *, batch_size: int = 8, precision: str = "auto",
               loader: ModelLoader | None = None) -> Judge:
    """A judge from a config item ({type: gold | verifier | reward_model | judge, ...options}) or a Judge."""
    if isinstance(spec, Judge):
        return spec
    if not isinstance(spec, CollectJudgeSection):
        from tunelab.config.loading import validate

        if not isinstance(spec, Mapping):
            raise ConfigError(f"a judge is a Judge or a mapping such as {{'type': 'gold'}}, not {type(spec).__name__}")
        spec = validate(CollectJudgeSection, dict(spec), "judge")
    if spec.type == "gold":
        return GoldJudge(spec.metric, spec.threshold)
    if spec.type == "verifier":
        return VerifierJudge(spec.function, spec.threshold)
    if spec.type == "reward_model":
        return RewardModelJudge(spec.model, threshold=spec.threshold, batch_size=spec.batch_size or batch_size,
                                precision=precision, loader=loader)
    return ModelJudge(spec.model, rubric=spec.rubric, max_new_tokens=spec.max_new_tokens or 64,
                      batch_size=spec.batch_size or batch_size, precision=precision, loader=loader)
