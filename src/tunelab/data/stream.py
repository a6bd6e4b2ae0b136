"""A corpus as one token stream for recurrent language models trained with truncated back-propagation through
time (Williams & Peng 1990; as in Zaremba et al. 2014 and Merity et al. 2018).

Training: the stream is cut into `num_streams` equal parallel streams (one per batch row), and each stream
into consecutive chunks of `bptt` tokens. Batch t holds chunk t of every stream, so a model that carries its
recurrent state from batch t to batch t + 1 reads every stream as one long text:

    tokens      a b c d e f g h i j k l m n o p q r s t u v w x y
    streams     row 0: a b c d e f g h i j k l     (inputs; targets are the next tokens b .. m)
                row 1: m n o p q r s t u v w x     (targets n .. y)
    bptt 5      batch 0: [a b c d e], [m n o p q]   batch 1: [f g h i j], [r s t u v]   batch 2: [k l], [w x]

A chunk's labels are its targets, already shifted (label t is the token after input t), so a chunk's last
input is scored against the first token of the next chunk. The few tokens past num_streams x stream length
(fewer than num_streams) are not trained on.

Evaluation scores every token but the first: the stream is cut into num_streams rows of equal length, the
last row padded (label -100), and read chunk by chunk with the state carried (`evaluation_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Sampler

from tunelab.data.encoded import IGNORE_INDEX, EncodedDataset
from tunelab.errors import DataError

if TYPE_CHECKING:
    from tunelab.tokenizer import Tokenizer


def encode_stream(documents: Sequence[str], tokenizer: Tokenizer, *, add_eos: bool = True) -> list[int]:
    """The token ids of every document, concatenated, each document ended by EOS (unless it already ends so).

    No BOS or other special tokens are added: a recurrent LM reads one continuous text.
    """
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise DataError("the tokenizer has no EOS token to end documents with")
    texts = [d for d in documents if d.strip()]
    stream: list[int] = []
    for ids in (tokenizer.encode_batch(texts, add_special_tokens=False)["input_ids"] if texts else []):
        stream.extend(ids)
        if add_eos and ids and ids[-1] != eos:
            stream.append(eos)
    return stream


def stream_length(num_tokens: int, num_streams: int) -> int:
    """Inputs per training stream: every stream needs one more token than its inputs (the last target)."""
    return (num_tokens - 1) // num_streams


def stream_chunks(tokens: Sequence[int], num_streams: int, bptt: int) -> EncodedDataset:
    """Training rows: feature s * num_chunks + t is chunk t of stream s, {"input_ids", "labels", "chunk", "length"}.

    Features in index order are the stream itself (minus the tail), so they also serve as evaluation data.
    """
    if num_streams < 1 or bptt < 1:
        raise ValueError(f"num_streams and bptt must be positive, got {num_streams} and {bptt}")
    length = stream_length(len(tokens), num_streams)
    if length < 1:
        raise DataError(f"{len(tokens)} tokens are too few for {num_streams} parallel streams (batch_size): "
                        f"each stream needs at least 2 tokens")
    num_chunks = math.ceil(length / bptt)
    features = []
    for s in range(num_streams):
        start = s * length
        for t in range(num_chunks):
            a, b = start + t * bptt, start + min(length, (t + 1) * bptt)
            features.append({"input_ids": list(tokens[a:b]), "labels": list(tokens[a + 1 : b + 1]), "chunk": t,
                             "length": b - a})
    return EncodedDataset(features, num_examples=1)


def stream_feature(tokens: Sequence[int]) -> dict:
    """A whole stream as one feature (evaluation data): {"input_ids": tokens, "length"}."""
    return {"input_ids": list(tokens), "length": len(tokens)}


def evaluation_rows(tokens: Sequence[int], num_streams: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) [R, L]: the stream cut into R <= num_streams rows that together predict every token
    but the first: row r reads tokens[r L : (r + 1) L] and is scored against tokens[r L + 1 : (r + 1) L + 1];
    the last row is padded (pad_token_id, label -100) where the stream ends."""
    targets = len(tokens) - 1
    if targets < 1:
        raise DataError(f"a stream of {len(tokens)} token(s) has nothing to predict")
    length = math.ceil(targets / num_streams)
    rows = math.ceil(targets / length)
    inputs = torch.full((rows, length), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    stream = torch.tensor(list(tokens), dtype=torch.long)
    for r in range(rows):
        a, b = r * length, min(targets, (r + 1) * length)
        inputs[r, : b - a] = stream[a:b]
        labels[r, : b - a] = stream[a + 1 : b + 1]
    return inputs, labels


def collate_stream_chunks(features: Sequence[dict]) -> dict:
    """One batch of chunks (all of the same length): input_ids, labels, attention_mask [B, T] and "chunk"
    (the chunk index, 0 at the start of the streams: where a carried state starts again from zeros)."""
    lengths = {len(f["input_ids"]) for f in features}
    if len(lengths) != 1:
        raise ValueError(f"a batch of stream chunks must have one length, got {sorted(lengths)}")
    input_ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": input_ids, "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long),
            "attention_mask": torch.ones_like(input_ids), "chunk": int(features[0].get("chunk", 0))}


class StreamBatchSampler(Sampler[list[int]]):
    """Batches of `stream_chunks` features in stream order: batch t = chunk t of every stream. Not shuffled
    (the state carries from one batch to the next); can start at `start_batch` to resume mid-epoch."""

    def __init__(self, num_streams: int, num_chunks: int) -> None:
        if num_streams < 1 or num_chunks < 1:
            raise ValueError(f"num_streams and num_chunks must be positive, got {num_streams} and {num_chunks}")
        self.num_streams, self.num_chunks = num_streams, num_chunks
        self.epoch = 0
        self.start_batch = 0

    @classmethod
    def for_features(cls, features: Sequence[dict], num_streams: int) -> "StreamBatchSampler":
        if len(features) % num_streams:
            raise ValueError(f"{len(features)} chunks do not split into {num_streams} streams")
        return cls(num_streams, len(features) // num_streams)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.num_batches}]")
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def num_batches(self) -> int:
        return self.num_chunks

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def batches(self) -> list[list[int]]:
        return [[s * self.num_chunks + t for s in range(self.num_streams)] for t in range(self.num_chunks)]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start_batch :]
