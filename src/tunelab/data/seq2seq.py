"""Parallel text for sequence-to-sequence tasks (translation, summarization): reading, encoding, batching.

Pairs come from
  - two line-aligned text files, the source and the target (`format: parallel`; line i of one is the
    translation of line i of the other), e.g. multi30k's train.en and train.de; or
  - records (jsonl, json, csv, tsv, parquet) with a source and a target field, `source` and `target` by
    default (DialogSum: `dialogue` and `summary`).

An encoder-decoder reads the source and learns the target by teacher forcing: the decoder input is the
start token followed by the target, the label at each position the next target token, ending with EOS:

    decoder_input_ids  <s>  Ein  Mann  läuft
    labels             Ein  Mann läuft </s>

A decoder-only model learns the same pairs as chat turns: `pairs_to_conversations` makes each pair a user
message (an instruction, a blank line, the source) answered by the target.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunelab.data.chat import Conversation
from tunelab.data.encoded import IGNORE_INDEX, EncodedDataset
from tunelab.data.readers import PathLike, Record, as_paths, optional, read_records, read_text_file, require
from tunelab.errors import DataError
from tunelab.tokenizer.pair import source_tokenizer, target_tokenizer

if TYPE_CHECKING:
    from tunelab.tokenizer import Tokenizer

PARALLEL = "parallel"


@dataclass
class TextPair:
    """A source text, its target (None when only sources are given, for prediction), and where it came from."""

    source: str
    target: str | None
    where: str


def _lines(path: Path) -> list[str]:
    text = read_text_file(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line.rstrip("\r") for line in lines]


def read_parallel(source_path: PathLike, target_path: PathLike | None = None) -> list[TextPair]:
    """Pairs of two line-aligned files (line i of the source with line i of the target), or sources alone.

    DataError when the files have different numbers of lines (naming both files, their counts and the line
    where the shorter one ends), or when a line is blank (naming the file and line).
    """
    source_path = Path(source_path)
    sources = _lines(source_path)
    if target_path is None:
        targets: list[str | None] = [None] * len(sources)
    else:
        target_path = Path(target_path)
        targets = list(_lines(target_path))
        if len(sources) != len(targets):
            short, long_ = (source_path, target_path) if len(sources) < len(targets) else (target_path, source_path)
            n = min(len(sources), len(targets))
            raise DataError(
                f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}: parallel files must "
                f"be line-aligned ({short} ends after line {n}; {long_}:{n + 1} has no partner)"
            )
    pairs = []
    for number, (source, target) in enumerate(zip(sources, targets), start=1):
        if not source.strip():
            raise DataError(f"{source_path}:{number}: blank line: every source line needs text")
        if target is not None and not target.strip():
            raise DataError(f"{target_path}:{number}: blank line: every target line needs text")
        pairs.append(TextPair(source, target, f"{source_path}:{number}"))
    return pairs


def load_pairs(paths: PathLike | Iterable[PathLike], *, format: str = "auto", source_field: str = "source",
               target_field: str = "target", require_target: bool = True) -> list[TextPair]:
    """Text pairs from two line-aligned files (format="parallel": paths = [source file, target file]) or from
    records with `source_field` and `target_field` (every other format).

    With require_target=False (prediction) the target file or field may be absent: a single parallel file
    holds the sources.
    """
    paths = as_paths(paths)
    if format == PARALLEL:
        if len(paths) == 2:
            return read_parallel(paths[0], paths[1])
        if len(paths) == 1 and not require_target:
            return read_parallel(paths[0])
        raise DataError(f"format parallel reads two line-aligned files, [source file, target file]; "
                        f"got {len(paths)}: {', '.join(map(str, paths))}")
    pairs = []
    for path in paths:
        for record in read_records(path, format):
            pairs.append(_record_pair(record, source_field, target_field, require_target))
    return pairs


def _record_pair(record: Record, source_field: str, target_field: str, require_target: bool) -> TextPair:
    source = require(record, source_field, str)
    target = require(record, target_field, str) if require_target else optional(record, target_field, str)
    if not source.strip():
        raise DataError(f"{record.source}: field '{source_field}' is empty")
    if target is not None and not target.strip():
        raise DataError(f"{record.source}: field '{target_field}' is empty")
    return TextPair(source, target, record.source)


# ---------------------------------------------------------------------------------------------- encoding


def _first(*ids: int | None) -> int | None:
    return next((i for i in ids if i is not None), None)


def target_special_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """(decoder start, end of sequence, padding) ids of the target side: start = bos (BERT: [CLS]) else eos;
    eos = eos (BERT: [SEP]); pad = pad else eos. The same ids a model built from this tokenizer gets."""
    tok = target_tokenizer(tokenizer)
    eos = _first(tok.eos_token_id, tok.sep_token_id)
    if eos is None:
        raise DataError(f"the target tokenizer ({tok!r}) has no end-of-sequence token (eos_token or sep_token); "
                        "a decoder needs one to know where a target ends")
    return _first(tok.bos_token_id, tok.cls_token_id, eos), eos, _first(tok.pad_token_id, eos)


def encode_seq2seq(pairs: Sequence[TextPair], tokenizer: Tokenizer, max_source_length: int,
                   max_target_length: int, *, decoder_start_token_id: int | None = None) -> EncodedDataset:
    """Features {"input_ids", "decoder_input_ids", "labels", "length"} (see the module docstring).

    The source is encoded with the source tokenizer's own special tokens and truncated to max_source_length;
    the target without special tokens, cut to max_target_length - 1 tokens, then framed by the start token
    and EOS. Pairs without a target (prediction) get input_ids only. num_truncated counts pairs cut on
    either side.
    """
    start, eos, _ = target_special_ids(tokenizer)
    start = decoder_start_token_id if decoder_start_token_id is not None else start
    src_tok, tgt_tok = source_tokenizer(tokenizer), target_tokenizer(tokenizer)
    dataset = EncodedDataset([], num_examples=len(pairs))
    if not pairs:
        return dataset
    sources = src_tok.encode_batch([p.source for p in pairs])["input_ids"]
    too_long = [i for i, ids in enumerate(sources) if len(ids) > max_source_length]
    if too_long:  # cut by the tokenizer, which keeps its special tokens (e.g. a final </s>) in place
        cut = src_tok.encode_batch([pairs[i].source for i in too_long], truncation=True,
                                   max_length=max_source_length)["input_ids"]
        for i, ids in zip(too_long, cut):
            sources[i] = ids
    with_target = [p.target is not None for p in pairs]
    targets = tgt_tok.encode_batch([p.target for p in pairs if p.target is not None],
                                   add_special_tokens=False)["input_ids"] if any(with_target) else []
    target_iter = iter(targets)
    cut_sources = set(too_long)
    for index, (pair, ids) in enumerate(zip(pairs, sources)):
        feature: dict = {"input_ids": list(ids), "length": len(ids)}
        truncated = index in cut_sources
        if pair.target is not None:
            tokens = next(target_iter)
            if len(tokens) > max_target_length - 1:
                tokens, truncated = tokens[: max_target_length - 1], True
            feature["decoder_input_ids"] = [start, *tokens]
            feature["labels"] = [*tokens, eos]
            feature["length"] += len(tokens) + 1
        dataset.num_truncated += truncated
        dataset.features.append(feature)
    return dataset


def collate_seq2seq(features: Sequence[dict], *, pad_token_id: int, target_pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch: input_ids / attention_mask [B, S] (padded with the source pad id), and when the features have
    targets decoder_input_ids / decoder_attention_mask / labels [B, T] (target pad id; labels -100)."""
    if not features:
        raise ValueError("collate_seq2seq got an empty batch")

    def pad(rows: list[list[int]], fill: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=torch.long)

    sources = [f["input_ids"] for f in features]
    batch = {"input_ids": pad(sources, pad_token_id), "attention_mask": pad([[1] * len(s) for s in sources], 0)}
    if "labels" in features[0]:
        decoder = [f["decoder_input_ids"] for f in features]
        batch["decoder_input_ids"] = pad(decoder, target_pad_token_id)
        batch["decoder_attention_mask"] = pad([[1] * len(d) for d in decoder], 0)
        batch["labels"] = pad([f["labels"] for f in features], IGNORE_INDEX)
    return batch


# ---------------------------------------------------------------------------------------------- decoder-only


def instruction_prompt(instruction: str, source: str) -> str:
    """The user message for a pair: the instruction, a blank line, the source (alpaca's instruction + input)."""
    return f"{instruction}\n\n{source}" if instruction.strip() else source


def pairs_to_conversations(pairs: Sequence[TextPair], instruction: str) -> list[Conversation]:
    """Each pair as a chat: user = instruction_prompt(instruction, source), assistant = target (if any)."""
    conversations = []
    for pair in pairs:
        messages = [{"role": "user", "content": instruction_prompt(instruction, pair.source)}]
        if pair.target is not None:
            messages.append({"role": "assistant", "content": pair.target})
        conversations.append(Conversation(messages, pair.where))
    return conversations
