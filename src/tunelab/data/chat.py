"""Chat / instruction data: alpaca, sharegpt and OpenAI-messages records as conversations; SFT encoding.

Every format becomes a `Conversation`: an optional system message, then user and assistant messages
alternating, starting with the user and (for training) ending with the assistant.

  - alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}; the user
              message is the instruction, followed by "\\n\\n" and the input when the input is not empty.
  - sharegpt: {"conversations": [{"from": "human" | "gpt" | "system", "value"}], "system"?}
  - messages: {"messages": [{"role": "system" | "user" | "assistant", "content"}]} (OpenAI chat format;
              content may be a list of {"type": "text", "text"} parts)

`encode_chat` renders a conversation with the tokenizer's chat template and learns only the assistant
turns: it finds each turn's characters by rendering the conversation up to the turn's prompt
(add_generation_prompt=True) and up to the end of the turn, and labels the tokens that overlap the text in
between (less the whitespace that separates turns).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.data.encoded import IGNORE_INDEX, EncodedDataset
from tunelab.data.readers import PathLike, Record, as_paths, optional, read_records, require
from tunelab.errors import DataError

if TYPE_CHECKING:
    from tunelab.tokenizer import Tokenizer

CHAT_FORMATS = ("auto", "alpaca", "sharegpt", "messages")
TRAIN_ON = ("assistant", "last", "all")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}


@dataclass
class Conversation:
    """Messages [{"role", "content"}] of one conversation and where it is in its file."""

    messages: list[dict[str, str]]
    source: str


def load_chat(paths: PathLike | Iterable[PathLike], *, format: str = "auto", file_format: str = "auto",
              final_assistant: bool = True) -> list[Conversation]:
    """Conversations of one or more files (jsonl/json/parquet...) in alpaca, sharegpt or messages format.

    format="auto" tells the format of each record by its fields (messages / conversations / instruction).
    With final_assistant=True (training) a conversation must end with an assistant message.
    """
    if format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {format!r} (known: {', '.join(CHAT_FORMATS)})")
    conversations = []
    for path in as_paths(paths):
        for record in read_records(path, file_format):
            kind = format if format != "auto" else detect_chat_format(record)
            if kind == "alpaca":
                messages, field = _from_alpaca(record), "instruction"
            elif kind == "sharegpt":
                messages, field = _from_sharegpt(record), "conversations"
            else:
                messages, field = _from_messages(record), "messages"
            validate_conversation(messages, record.source, field=field, final_assistant=final_assistant)
            conversations.append(Conversation(messages, record.source))
    return conversations


def detect_chat_format(record: Record) -> str:
    """"messages", "sharegpt" or "alpaca", by the fields of the record."""
    if "messages" in record.data:
        return "messages"
    if "conversations" in record.data:
        return "sharegpt"
    if "instruction" in record.data:
        return "alpaca"
    fields = ", ".join(repr(k) for k in list(record.data)[:10])
    raise DataError(f"{record.source}: cannot tell the chat format: expected a field 'messages' (OpenAI), "
                    f"'conversations' (sharegpt) or 'instruction' (alpaca); found {fields or 'no fields'}")


def _from_alpaca(record: Record) -> list[dict[str, str]]:
    instruction = require(record, "instruction", str)
    extra = optional(record, "input", str, "")
    output = require(record, "output", str)
    system = optional(record, "system", str, "")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for k, turn in enumerate(optional(record, "history", list, [])):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"{record.source}: field 'history[{k}]': expected a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_sharegpt(record: Record) -> list[dict[str, str]]:
    turns = require(record, "conversations", list)
    system = optional(record, "system", str, "")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for k, turn in enumerate(turns):
        field = f"conversations[{k}]"
        if not isinstance(turn, dict):
            raise DataError(f"{record.source}: field '{field}': expected an object {{from, value}}")
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"{record.source}: field '{field}.from': unknown speaker {speaker!r} "
                            f"(known: {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(value, str):
            raise DataError(f"{record.source}: field '{field}.value': expected a string, found {type(value).__name__}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return messages


def _from_messages(record: Record, field: str = "messages") -> list[dict[str, str]]:
    """The record's "messages" list; errors name it as `field` (where it sits in the user's record)."""
    raw = require(record, "messages", list)
    name = field
    messages = []
    for k, message in enumerate(raw):
        field = f"{name}[{k}]"
        if not isinstance(message, dict):
            raise DataError(f"{record.source}: field '{field}': expected an object {{role, content}}")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{record.source}: field '{field}.role': unsupported role {role!r} "
                            f"(known: {', '.join(ROLES)})")
        messages.append({"role": role, "content": _content_text(message.get("content"), record.source, field)})
    return messages


def _content_text(content: Any, source: str, field: str) -> str:
    """Message content as text: a string, or the concatenated text of a list of {"type": "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise DataError(f"{source}: field '{field}.content[{k}]': only text parts "
                                f"{{\"type\": \"text\", \"text\": ...}} are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"{source}: field '{field}.content': expected a string, found {type(content).__name__}")


def validate_conversation(messages: Sequence[dict[str, str]], source: str, *, field: str = "messages",
                          final_assistant: bool = True) -> None:
    """Check roles and contents: [system], user, assistant, user, ... (ending with assistant if asked).

    DataError names the source, the field and the position of the first message that breaks the order.
    """
    if not messages:
        raise DataError(f"{source}: field '{field}': empty conversation")
    expected = "user"
    for k, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            if k != 0:
                raise DataError(f"{source}: field '{field}': message {k} is a system message; only the first "
                                f"message may be one")
            continue
        if role != expected:
            after = messages[k - 1]["role"] if k else "the start"
            raise DataError(f"{source}: field '{field}': message {k} has role '{role}' after {after}; expected "
                            f"'{expected}' (user and assistant messages must alternate, starting with the user)")
        if not content.strip():
            raise DataError(f"{source}: field '{field}': message {k} ({role}) has empty content")
        expected = "assistant" if role == "user" else "user"
    last = messages[-1]["role"]
    if final_assistant and last != "assistant":
        raise DataError(f"{source}: field '{field}': the conversation ends with a {last} message; a training "
                        f"conversation must end with the assistant's answer")


def assistant_spans(messages: Sequence[dict[str, str]], tokenizer: Tokenizer, source: str = "",
                    *, last_only: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn's span starts where the prompt for it ends (messages before it, add_generation_prompt=True) and
    ends where the conversation through the turn ends, less trailing whitespace: the answer and the
    template's end-of-turn marker, without the newline that separates turns. Tokens overlapping a span are
    learned.
    """
    full = tokenizer.apply_chat_template(list(messages))
    turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
    if last_only:
        turns = turns[-1:]
    spans = []
    for k in turns:
        prompt = tokenizer.apply_chat_template(list(messages[:k]), add_generation_prompt=True)
        through = tokenizer.apply_chat_template(list(messages[:k + 1]))
        if not (through.startswith(prompt) and full.startswith(through)):
            raise DataError(f"{source}: the chat template does not render this conversation prefix by prefix "
                            f"(message {k}), so its assistant turns cannot be located")
        end = len(through.rstrip())
        spans.append((len(prompt), end if end > len(prompt) else len(through)))
    return full, spans


def encode_chat(conversations: Sequence[Conversation], tokenizer: Tokenizer, max_length: int, *,
                train_on: str = "assistant") -> EncodedDataset:
    """Features {"input_ids", "labels", "length"} for supervised fine-tuning on chats.

    train_on: "assistant" (every assistant turn), "last" (only the final one) or "all" (every token).
    labels are the input ids on the learned tokens (assistant text and its end-of-turn token) and -100
    elsewhere; the shift happens in the loss. Longer conversations are cut to `max_length` (num_truncated);
    one with no learned token left is skipped (num_skipped, reasons in skipped_reasons).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    texts, all_spans = [], []
    for conversation in conversations:
        if train_on == "all":
            texts.append(tokenizer.apply_chat_template(conversation.messages))
            all_spans.append(None)
        else:
            text, spans = assistant_spans(conversation.messages, tokenizer, conversation.source,
                                          last_only=train_on == "last")
            texts.append(text)
            all_spans.append(spans)
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False, return_offsets=True) if texts else \
        {"input_ids": [], "offsets": []}

    dataset = EncodedDataset([], num_examples=len(conversations))
    for conversation, ids, offsets, spans in zip(conversations, encoded["input_ids"], encoded["offsets"], all_spans):
        labels = list(ids) if spans is None else _span_labels(ids, offsets, spans)
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            dataset.num_truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            dataset.num_skipped += 1
            dataset.skipped_reasons.append(f"{conversation.source}: no assistant token within {max_length} tokens")
            continue
        dataset.features.append({"input_ids": list(ids), "labels": labels, "length": len(ids)})
    return dataset


def _span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """ids on the tokens that overlap one of the character spans, -100 elsewhere.

    A token that straddles the start of a turn (" Hello" after a prompt ending in ":") holds answer text and
    is learned; an empty-width token counts where it stands.
    """
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for position, (token_id, (start, end)) in enumerate(zip(ids, offsets)):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        if (end > span_start and start < span_end) or (start == end and span_start <= start):
            labels[position] = token_id
    return labels
