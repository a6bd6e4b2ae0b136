"""Prompts for online learning (GRPO): records with a prompt and whatever fields the reward functions read.

A record gives its prompt as one of

  - "prompt":       a string (one user turn) or a list of OpenAI messages ending with a user message;
  - "messages":     OpenAI messages; a final assistant message (a reference answer) is left out of the prompt;
  - "instruction":  alpaca's instruction, followed by "\\n\\n" and "input" when that is not empty;

and keeps every other field (`answer`, `keys`, ...): the whole record is what a verifier gets as `example`.

Encoding: with a chat template (a chat model) the prompt is rendered as the conversation so far with the
assistant's turn opened (add_generation_prompt); without one, a string prompt is encoded as it is and a message
list as hh-rlhf's plain transcript ("\\n\\nHuman: ...\\n\\nAssistant:"). A prompt longer than max_prompt_length
tokens is skipped (cutting it would cut the chat template), and named in the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.data.chat import _from_messages, validate_conversation
from tunelab.data.encoded import EncodedDataset
from tunelab.data.readers import PathLike, Record, as_paths, optional, read_records
from tunelab.errors import DataError

if TYPE_CHECKING:
    from tunelab.tokenizer import Tokenizer


@dataclass
class PromptExample:
    """A prompt as chat messages (ending with a user turn), its plain text when it was given as a string, the
    whole record (what verifiers read) and where it is in its file."""

    messages: list[dict[str, str]]
    text: str | None
    fields: dict[str, Any]
    source: str


def load_prompts(paths: PathLike | Iterable[PathLike], *, format: str = "auto") -> list[PromptExample]:
    """The prompt records of one or more files (jsonl, json, csv, tsv, parquet); DataError names the file, the
    line and the field of a record without a usable prompt."""
    return [prompt_example(record) for path in as_paths(paths) for record in read_records(path, format)]


def prompt_example(record: Record) -> PromptExample:
    """One record as a PromptExample (see the module docstring for the accepted fields)."""
    data = record.data
    if "prompt" in data:
        value = data["prompt"]
        if isinstance(value, str):
            if not value.strip():
                raise DataError(f"{record.source}: field 'prompt' is empty")
            return PromptExample([{"role": "user", "content": value}], value, data, record.source)
        if isinstance(value, list):
            messages = _from_messages(Record({"messages": value}, record.source), field="prompt")
            return PromptExample(_prompt_turns(messages, record.source, "prompt"), None, data, record.source)
        raise DataError(f"{record.source}: field 'prompt': expected a string or a list of messages, found "
                        f"{type(value).__name__}")
    if "messages" in data:
        messages = _from_messages(record)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a reference answer, not part of the prompt
        return PromptExample(_prompt_turns(messages, record.source, "messages"), None, data, record.source)
    if "instruction" in data:
        instruction = optional(record, "instruction", str, "")
        extra = optional(record, "input", str, "")
        if not instruction.strip():
            raise DataError(f"{record.source}: field 'instruction' is empty")
        text = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return PromptExample([{"role": "user", "content": text}], text, data, record.source)
    fields = ", ".join(repr(k) for k in list(data)[:10])
    raise DataError(f"{record.source}: no prompt: expected a field 'prompt' (a string or messages), 'messages' "
                    f"(OpenAI) or 'instruction' (alpaca); found {fields or 'no fields'}")


def _prompt_turns(messages: list[dict[str, str]], source: str, field: str) -> list[dict[str, str]]:
    validate_conversation(messages, source, field=field, final_assistant=False)
    if messages[-1]["role"] != "user":
        raise DataError(f"{source}: field '{field}': a prompt ends with a user message, not {messages[-1]['role']}")
    return messages


def render_prompt(tokenizer: Tokenizer, example: PromptExample) -> list[int]:
    """The token ids the model continues: the chat template with the assistant's turn opened, or the plain text
    (see the module docstring)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(example.messages, add_generation_prompt=True, tokenize=True)
    if example.text is not None:
        return tokenizer.encode(example.text)
    from tunelab.data.preference import PLAIN_TRANSCRIPT_TEMPLATE
    from tunelab.tokenizer.chat import render_chat_template

    return tokenizer.encode(render_chat_template(PLAIN_TRANSCRIPT_TEMPLATE, example.messages,
                                                 add_generation_prompt=True))


def encode_prompts(examples: Sequence[PromptExample], tokenizer: Tokenizer, max_prompt_length: int) -> EncodedDataset:
    """Features {"prompt_ids", "length", "index"} (index: the example's position in `examples`, which the reward
    functions read); prompts longer than max_prompt_length tokens are skipped with the reason."""
    dataset = EncodedDataset([], num_examples=len(examples))
    for index, example in enumerate(examples):
        ids = render_prompt(tokenizer, example)
        if not ids:
            dataset.num_skipped += 1
            dataset.skipped_reasons.append(f"{example.source}: the prompt encodes to no tokens")
        elif len(ids) > max_prompt_length:
            dataset.num_skipped += 1
            dataset.skipped_reasons.append(f"{example.source}: the prompt has {len(ids)} tokens, more than "
                                           f"data.max_prompt_length ({max_prompt_length})")
        else:
            dataset.features.append({"prompt_ids": list(ids), "length": len(ids), "index": index})
    return dataset
