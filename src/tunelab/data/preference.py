"""Preference data: pairs of a chosen and a rejected response to one prompt, and labelled single responses.

Every format becomes a `PreferencePair`: the prompt as chat messages ([system], user, assistant, ...,
user) and the two answers as text. Formats, told apart per record (format="auto") or named:

  - hh-rlhf:  {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}: two whole transcripts
              that share every turn but the last assistant one (Anthropic's HH-RLHF). The shared turns are
              the prompt; two turns of one speaker in a row (a few HH-RLHF transcripts have them) are one
              message. A record whose transcripts differ before the last turn, or whose prompt is not a
              dialogue that ends with the human, is skipped, with its place and the reason. An empty answer
              is an answer (saying nothing was preferred).
  - prompt:   {"prompt", "chosen", "rejected"}: the prompt a string (one user turn) or a list of messages;
              each answer a string, an assistant message or a one-message list. Without "prompt", chosen
              and rejected are whole conversations whose shared messages are the prompt.
  - sharegpt: {"conversations": [{"from", "value"}, ...], "chosen": {"from", "value"}, "rejected": {...}}
              (LLaMA-Factory's DPO format, as dpo_en_demo.json)
  - openai:   {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content"}],
              "non_preferred_output": [...]} (OpenAI's preference fine-tuning format)

For KTO, `load_labeled` reads single responses with a verdict, {"prompt", "completion", "label": true |
false} (prompt and completion as above), and also splits any preference pair into a desirable and an
undesirable example.

Encoding renders the prompt with the model's chat template and the generation prompt (add_generation_prompt)
and takes each answer as the text the template adds after it: the answer and the end-of-turn marker. Prompt
and answers are tokenized separately (the answer is what the model generates after the prompt). Labels are
on the answer only. Too long an example loses the start of its prompt first; the answers are cut only when
the prompt would keep fewer than max_prompt_length tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.data.chat import SHAREGPT_ROLES, _content_text, _from_messages, _from_sharegpt, validate_conversation
from tunelab.data.encoded import EncodedDataset
from tunelab.data.readers import PathLike, Record, as_paths, read_records, require
from tunelab.errors import DataError

if TYPE_CHECKING:
    from tunelab.tokenizer import Tokenizer

PREFERENCE_FORMATS = ("auto", "hh-rlhf", "prompt", "sharegpt", "openai")

# hh-rlhf's own transcript layout, used to render conversations for a model without a chat template (base
# models, encoders): "\n\nHuman: ...\n\nAssistant: ...", with "\n\nAssistant:" as the generation prompt
PLAIN_TRANSCRIPT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
    "{% else %}{{ '\n\nAssistant: ' + message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class PreferencePair:
    """A prompt (chat messages ending with a user turn), the chosen and the rejected answer, and where it is."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str


@dataclass
class LabeledCompletion:
    """A prompt, one answer and whether it is desirable (KTO's unpaired data)."""

    prompt: list[dict[str, str]]
    completion: str
    desirable: bool
    source: str


# ---------------------------------------------------------------------------------------------- reading


def load_preferences(paths: PathLike | Iterable[PathLike], *, format: str = "auto",
                     file_format: str = "auto") -> tuple[list[PreferencePair], list[str]]:
    """(pairs, skipped) of one or more files; skipped names each record left out and why (hh-rlhf only).

    format: one of PREFERENCE_FORMATS ("auto" tells each record's format by its fields); file_format: how
    the file is stored (jsonl, json, parquet; "auto" by extension). Malformed records raise DataError naming
    the file, the line and the field.
    """
    if format not in PREFERENCE_FORMATS:
        raise ValueError(f"unknown preference format {format!r} (known: {', '.join(PREFERENCE_FORMATS)})")
    pairs: list[PreferencePair] = []
    skipped: list[str] = []
    for path in as_paths(paths):
        for record in read_records(path, file_format):
            pair = _pair_of(record, format if format != "auto" else detect_preference_format(record), skipped)
            if pair is not None:
                pairs.append(pair)
    return pairs, skipped


def detect_preference_format(record: Record) -> str:
    """"openai", "sharegpt", "prompt" or "hh-rlhf", by the fields of the record."""
    data = record.data
    if "preferred_output" in data or "non_preferred_output" in data:
        return "openai"
    if "conversations" in data:
        return "sharegpt"
    if "prompt" in data:
        return "prompt"
    if "chosen" in data or "rejected" in data:  # whole transcripts (strings) or conversations (lists)
        return "hh-rlhf" if isinstance(data.get("chosen", data.get("rejected")), str) else "prompt"
    fields = ", ".join(repr(k) for k in list(data)[:10])
    raise DataError(f"{record.source}: cannot tell the preference format: expected 'chosen' and 'rejected' "
                    f"(with 'prompt', 'conversations', or whole hh-rlhf transcripts) or OpenAI's 'input' / "
                    f"'preferred_output' / 'non_preferred_output'; found {fields or 'no fields'}")


def _pair_of(record: Record, kind: str, skipped: list[str]) -> PreferencePair | None:
    if kind == "hh-rlhf":
        return _hh_pair(record, skipped)
    if kind == "prompt":
        return _prompt_pair(record)
    if kind == "sharegpt":
        return _sharegpt_pair(record)
    return _openai_pair(record)


def parse_hh_transcript(text: str, source: str, field: str) -> list[dict[str, str]]:
    """An hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages, contents stripped."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)  # [before, speaker, body, speaker, body, ...]
    if len(parts) < 3:
        raise DataError(f"{source}: field '{field}': not an hh-rlhf transcript (no '\\n\\nHuman:' or "
                        f"'\\n\\nAssistant:' turn) in {text[:60]!r}")
    if parts[0].strip():
        raise DataError(f"{source}: field '{field}': text before the first turn: {parts[0][:60]!r}")
    messages: list[dict[str, str]] = []
    for who, body in zip(parts[1::2], parts[2::2]):
        role = "user" if who == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:  # two turns of one speaker in a row: one message
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{body.strip()}".strip()
        else:
            messages.append({"role": role, "content": body.strip()})
    return messages


def _hh_pair(record: Record, skipped: list[str]) -> PreferencePair | None:
    chosen = parse_hh_transcript(require(record, "chosen", str), record.source, "chosen")
    rejected = parse_hh_transcript(require(record, "rejected", str), record.source, "rejected")
    reason = None
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        reason = "a transcript does not end with an Assistant turn"
    elif len(chosen) != len(rejected) or chosen[:-1] != rejected[:-1]:
        shared = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        reason = (f"chosen ({len(chosen)} turns) and rejected ({len(rejected)} turns) differ before their last "
                  f"turn (at turn {shared})")
    elif chosen[-1]["content"] == rejected[-1]["content"]:
        reason = "chosen and rejected give the same answer"
    else:
        try:
            _checked_prompt(chosen[:-1], record.source, "chosen")
        except DataError as err:
            reason = str(err).removeprefix(f"{record.source}: ")
    if reason is not None:
        skipped.append(f"{record.source}: {reason}")
        return None
    return PreferencePair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], record.source)


def _prompt_messages(value: Any, source: str, field: str) -> list[dict[str, str]]:
    """A prompt given as a string (one user turn) or as a list of {role, content} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{source}: field '{field}': empty prompt")
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return _from_messages(Record({"messages": value}, source), field=field)
    raise DataError(f"{source}: field '{field}': expected a string or a list of messages, found "
                    f"{type(value).__name__}")


def _answer_text(value: Any, source: str, field: str) -> str:
    """An answer given as a string, an assistant message {role, content}, or a list of one such message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(f"{source}: field '{field}': expected one assistant message, found a list of {len(value)}")
        value, field = value[0], f"{field}[0]"
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise DataError(f"{source}: field '{field}.role': the answer must be an assistant message, "
                            f"not {value.get('role')!r}")
        return _content_text(value.get("content"), source, field)
    raise DataError(f"{source}: field '{field}': expected a string or an assistant message, found "
                    f"{type(value).__name__}")


def _checked_prompt(prompt: list[dict[str, str]], source: str, field: str) -> list[dict[str, str]]:
    validate_conversation(prompt, source, field=field, final_assistant=False)
    if prompt[-1]["role"] != "user":
        raise DataError(f"{source}: field '{field}': the prompt ends with a {prompt[-1]['role']} message; it must "
                        f"end with the user's turn that the answers reply to")
    return prompt


def _prompt_pair(record: Record) -> PreferencePair:
    source = record.source
    chosen_value, rejected_value = require(record, "chosen"), require(record, "rejected")
    if "prompt" in record.data:
        prompt = _prompt_messages(require(record, "prompt"), source, "prompt")
        chosen = _answer_text(chosen_value, source, "chosen")
        rejected = _answer_text(rejected_value, source, "rejected")
        return PreferencePair(_checked_prompt(prompt, source, "prompt"), chosen, rejected, source)
    # no prompt: two whole conversations, the shared messages are the prompt
    if not (isinstance(chosen_value, list) and isinstance(rejected_value, list)):
        raise DataError(f"{source}: missing field 'prompt' (without it, 'chosen' and 'rejected' must be whole "
                        f"conversations: lists of messages)")
    chosen = _from_messages(Record({"messages": chosen_value}, source), field="chosen")
    rejected = _from_messages(Record({"messages": rejected_value}, source), field="rejected")
    if len(chosen) != len(rejected) or chosen[:-1] != rejected[:-1]:
        raise DataError(f"{source}: fields 'chosen' and 'rejected': the conversations must share every message but "
                        f"the last (the two answers)")
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{source}: field '{field}': the conversation must end with the assistant's answer")
    return PreferencePair(_checked_prompt(chosen[:-1], source, "chosen"), chosen[-1]["content"],
                          rejected[-1]["content"], source)


def _sharegpt_answer(value: Any, source: str, field: str) -> str:
    if not isinstance(value, dict):
        raise DataError(f"{source}: field '{field}': expected an object {{from, value}}, found {type(value).__name__}")
    if SHAREGPT_ROLES.get(value.get("from")) != "assistant":
        raise DataError(f"{source}: field '{field}.from': the answer must come from the assistant (gpt), "
                        f"not {value.get('from')!r}")
    if not isinstance(value.get("value"), str):
        raise DataError(f"{source}: field '{field}.value': expected a string")
    return value["value"]


def _sharegpt_pair(record: Record) -> PreferencePair:
    prompt = _from_sharegpt(record)
    chosen = _sharegpt_answer(require(record, "chosen"), record.source, "chosen")
    rejected = _sharegpt_answer(require(record, "rejected"), record.source, "rejected")
    return PreferencePair(_checked_prompt(prompt, record.source, "conversations"), chosen, rejected, record.source)


def _openai_pair(record: Record) -> PreferencePair:
    source = record.source
    given = require(record, "input", dict)
    if not isinstance(given.get("messages"), list):
        raise DataError(f"{source}: field 'input.messages': expected a list of messages")
    prompt = _from_messages(Record({"messages": given["messages"]}, source), field="input.messages")
    chosen = _answer_text(require(record, "preferred_output"), source, "preferred_output")
    rejected = _answer_text(require(record, "non_preferred_output"), source, "non_preferred_output")
    return PreferencePair(_checked_prompt(prompt, source, "input.messages"), chosen, rejected, source)


def load_labeled(paths: PathLike | Iterable[PathLike], *, format: str = "auto",
                 file_format: str = "auto") -> tuple[list[LabeledCompletion], list[str]]:
    """(examples, skipped) for KTO: {"prompt", "completion", "label": bool} records, and every preference pair
    of the files as a desirable (chosen) and an undesirable (rejected) example."""
    examples: list[LabeledCompletion] = []
    skipped: list[str] = []
    for path in as_paths(paths):
        for record in read_records(path, file_format):
            if "completion" in record.data or "label" in record.data:
                examples.append(_labeled(record))
                continue
            pair = _pair_of(record, format if format != "auto" else detect_preference_format(record), skipped)
            if pair is not None:
                examples += [LabeledCompletion(pair.prompt, pair.chosen, True, pair.source),
                             LabeledCompletion(pair.prompt, pair.rejected, False, pair.source)]
    return examples, skipped


def _labeled(record: Record) -> LabeledCompletion:
    source = record.source
    prompt = _checked_prompt(_prompt_messages(require(record, "prompt"), source, "prompt"), source, "prompt")
    completion = _answer_text(require(record, "completion"), source, "completion")
    label = require(record, "label", bool)
    return LabeledCompletion(prompt, completion, label, source)


def pairs_to_labeled(pairs: Sequence[PreferencePair]) -> list[LabeledCompletion]:
    """Each pair as a desirable and an undesirable example (KTO on paired data)."""
    return [example for pair in pairs for example in (
        LabeledCompletion(pair.prompt, pair.chosen, True, pair.source),
        LabeledCompletion(pair.prompt, pair.rejected, False, pair.source))]


# ---------------------------------------------------------------------------------------------- encoding


def render_prompt_and_answers(tokenizer: Tokenizer, prompt: list[dict[str, str]], answers: Sequence[str],
                              source: str = "") -> tuple[str, list[str]]:
    """(prompt text ending with the generation prompt, the text each answer adds after it).

    Rendered with the tokenizer's chat template, or, for a tokenizer without one, with hh-rlhf's plain
    transcript ("\\n\\nHuman: ...\\n\\nAssistant: ..."). An answer's text is the answer and the template's
    end-of-turn marker, without the whitespace that separates turns.
    """
    render = _renderer(tokenizer)
    prompt_text = render(prompt, add_generation_prompt=True)
    texts = []
    for answer in answers:
        full = render([*prompt, {"role": "assistant", "content": answer}], add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise DataError(f"{source}: the chat template does not render the prompt as the start of the whole "
                            f"conversation, so the answer cannot be separated from it")
        texts.append(full[len(prompt_text):].rstrip())
    return prompt_text, texts


def _renderer(tokenizer: Tokenizer):
    if tokenizer.chat_template:
        return lambda messages, add_generation_prompt: tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt)
    from tunelab.tokenizer.chat import render_chat_template

    return lambda messages, add_generation_prompt: render_chat_template(
        PLAIN_TRANSCRIPT_TEMPLATE, messages, add_generation_prompt=add_generation_prompt)


def fit_lengths(prompt_length: int, answer_lengths: Sequence[int], max_length: int,
                max_prompt_length: int) -> tuple[int, int]:
    """(prompt tokens kept, answer tokens kept) so that prompt + the longest answer fit in max_length.

    The answers stay whole while the prompt can keep at least min(its length, max_prompt_length) of its last
    tokens; otherwise the prompt keeps that many and the answers are cut to the rest.
    """
    longest = max(answer_lengths)
    if prompt_length + longest <= max_length:
        return prompt_length, longest
    floor = min(prompt_length, max_prompt_length)
    if max_length - longest >= floor:
        return max_length - longest, longest
    return floor, max_length - floor


def encode_preferences(pairs: Sequence[PreferencePair], tokenizer: Tokenizer, max_length: int, *,
                       max_prompt_length: int | None = None, special_tokens: bool = False) -> EncodedDataset:
    """Features {"prompt_ids", "chosen_ids", "rejected_ids", "length"} (length: prompt + the longer answer).

    special_tokens: wrap each whole row as the tokenizer's encoder does ([CLS] ... [SEP]) when it has no chat
    template (a BERT-style reward model); the two tokens count towards max_length.
    """
    budget_max_prompt = max_prompt_length if max_prompt_length is not None else max_length // 2
    wrap = _wrapping(tokenizer) if special_tokens else ([], [])
    limit = max_length - len(wrap[0]) - len(wrap[1])
    dataset = EncodedDataset([], num_examples=len(pairs))
    rendered = [render_prompt_and_answers(tokenizer, p.prompt, [p.chosen, p.rejected], p.source) for p in pairs]
    prompts = _encode_texts(tokenizer, [prompt for prompt, _ in rendered])
    answers = _encode_texts(tokenizer, [text for _, texts in rendered for text in texts])
    for k, pair in enumerate(pairs):
        prompt_ids, chosen_ids, rejected_ids = prompts[k], answers[2 * k], answers[2 * k + 1]
        if not chosen_ids or not rejected_ids:
            dataset.num_skipped += 1
            dataset.skipped_reasons.append(f"{pair.source}: an answer renders to no tokens")
            continue
        keep_prompt, keep_answer = fit_lengths(len(prompt_ids), [len(chosen_ids), len(rejected_ids)], limit,
                                               budget_max_prompt)
        if keep_prompt < len(prompt_ids) or keep_answer < max(len(chosen_ids), len(rejected_ids)):
            dataset.num_truncated += 1
        prompt_ids = wrap[0] + prompt_ids[len(prompt_ids) - keep_prompt:]
        chosen_ids, rejected_ids = chosen_ids[:keep_answer] + wrap[1], rejected_ids[:keep_answer] + wrap[1]
        dataset.features.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
                                 "length": len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))})
    return dataset


def encode_answers(prompts: Sequence[list[dict[str, str]]], answers: Sequence[str], tokenizer: Tokenizer,
                   max_length: int, *, max_prompt_length: int | None = None,
                   special_tokens: bool = False) -> list[dict]:
    """Features {"prompt_ids", "answer_ids", "length"} of single answers, encoded as encode_preferences encodes
    each side of a pair, so that a reward model scores an answer as it was trained to (an answer that
    renders to no tokens keeps the template's end-of-turn marker, or is empty for a plain transcript)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    budget_max_prompt = max_prompt_length if max_prompt_length is not None else max_length // 2
    wrap = _wrapping(tokenizer) if special_tokens else ([], [])
    limit = max_length - len(wrap[0]) - len(wrap[1])
    rendered = [render_prompt_and_answers(tokenizer, prompt, [answer]) for prompt, answer in zip(prompts, answers)]
    prompt_ids = _encode_texts(tokenizer, [prompt for prompt, _ in rendered])
    answer_ids = _encode_texts(tokenizer, [texts[0] for _, texts in rendered])
    features = []
    for prompt, answer in zip(prompt_ids, answer_ids):
        keep_prompt, keep_answer = fit_lengths(len(prompt), [len(answer)], limit, budget_max_prompt)
        prompt = wrap[0] + prompt[len(prompt) - keep_prompt:]
        answer = answer[:keep_answer] + wrap[1]
        features.append({"prompt_ids": prompt, "answer_ids": answer, "length": len(prompt) + len(answer)})
    return features


def encode_labeled(examples: Sequence[LabeledCompletion], tokenizer: Tokenizer, max_length: int, *,
                   max_prompt_length: int | None = None, seed: int = 0) -> EncodedDataset:
    """Features {"prompt_ids", "completion_ids", "desirable", "kl_ids", "length"} for KTO.

    kl_ids is the answer of another example with another prompt (a fixed, seeded partner), cut to fit after
    this prompt: KTO estimates its reference point from such mismatched pairs (Ethayarajh et al. 2024,
    sec. 4.1). Fixing the partner lets the reference log-probabilities be computed once.
    """
    budget_max_prompt = max_prompt_length if max_prompt_length is not None else max_length // 2
    dataset = EncodedDataset([], num_examples=len(examples))
    rendered = [render_prompt_and_answers(tokenizer, e.prompt, [e.completion], e.source) for e in examples]
    prompts = _encode_texts(tokenizer, [prompt for prompt, _ in rendered])
    answers = _encode_texts(tokenizer, [texts[0] for _, texts in rendered])
    kept: list[int] = []
    for k, example in enumerate(examples):
        if not answers[k]:
            dataset.num_skipped += 1
            dataset.skipped_reasons.append(f"{example.source}: the answer renders to no tokens")
            continue
        keep_prompt, keep_answer = fit_lengths(len(prompts[k]), [len(answers[k])], max_length, budget_max_prompt)
        if keep_prompt < len(prompts[k]) or keep_answer < len(answers[k]):
            dataset.num_truncated += 1
        prompt_ids = prompts[k][len(prompts[k]) - keep_prompt:]
        dataset.features.append({"prompt_ids": prompt_ids, "completion_ids": answers[k][:keep_answer],
                                 "desirable": bool(example.desirable)})
        kept.append(k)
    partners = mismatched_partners([_prompt_key(examples[k].prompt) for k in kept], seed)
    for feature, partner in zip(dataset.features, partners):
        room = max(1, max_length - len(feature["prompt_ids"]))
        feature["kl_ids"] = dataset.features[partner]["completion_ids"][:room]
        feature["length"] = len(feature["prompt_ids"]) + max(len(feature["completion_ids"]), len(feature["kl_ids"]))
    return dataset


def mismatched_partners(keys: Sequence[Any], seed: int) -> list[int]:
    """For each item, another item with a different key (prompt), chosen by a seeded shuffle: item order[k]
    is paired with the next item in the shuffled order whose key differs (itself only if every key is equal)."""
    n = len(keys)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partners = [0] * n
    for position, item in enumerate(order):
        partner = item
        for step in range(1, n):
            candidate = order[(position + step) % n]
            if keys[candidate] != keys[item]:
                partner = candidate
                break
        partners[item] = partner
    return partners


def _prompt_key(prompt: list[dict[str, str]]) -> tuple:
    return tuple((m["role"], m["content"]) for m in prompt)


def _encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer.encode_batch(texts, add_special_tokens=False)["input_ids"]


def _wrapping(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """([CLS], [SEP]) ids for an encoder's tokenizer without a chat template, else nothing."""
    if tokenizer.chat_template:
        return [], []
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        return [], []
    return [cls], [sep]
