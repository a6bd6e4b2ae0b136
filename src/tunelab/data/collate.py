"""Batching features into padded tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunelab.data.encoded import IGNORE_INDEX


# sequence keys -> what fills the padding (None: the pad_token_id / label_pad given to pad_collate)
_SEQUENCE_KEYS = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": None, "position_ids": 0,
                  "document_ids": -1}
_SCALAR_KEYS = ("start_positions", "end_positions", "next_sentence_label")


def pad_collate(features: Sequence[dict], *, pad_token_id: int, label_pad: int = IGNORE_INDEX,
                padding_side: str = "right", pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """A batch of features as tensors padded to the longest row (or to a multiple of `pad_to_multiple_of`).

    Padded: input_ids (pad_token_id), attention_mask (made from the lengths when absent; 0 on padding),
    token_type_ids and position_ids (0), document_ids (-1: no document), labels (label_pad) when they are
    sequences. Scalar labels become a 1-D tensor (long, or float for regression), as do start_positions /
    end_positions and next_sentence_label. Other keys (word_ids, offsets, example_id, length, ...) are not tensors and are left out.
    """
    if not features:
        raise ValueError("pad_collate got an empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [len(feature["input_ids"]) for feature in features]
    longest = max(lengths)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of

    batch: dict[str, torch.Tensor] = {}
    keys = [key for key in _SEQUENCE_KEYS if key in features[0]]
    if "attention_mask" not in keys:
        keys.insert(1, "attention_mask")
    for key in keys:
        if key == "labels" and not isinstance(features[0]["labels"], (list, tuple)):
            batch["labels"] = _scalars(features, "labels")
            continue
        fill = _SEQUENCE_KEYS[key]
        if fill is None:
            fill = pad_token_id if key == "input_ids" else label_pad
        rows = []
        for feature, length in zip(features, lengths):
            if key == "attention_mask" and key not in feature:
                row = [1] * length
            else:
                if key not in feature:
                    raise ValueError(f"a feature lacks {key!r}, which other features of the batch have")
                row = list(feature[key])
                if len(row) != length:
                    raise ValueError(f"a feature has {len(row)} {key} for {length} input_ids")
            padding = [fill] * (longest - length)
            rows.append(row + padding if padding_side == "right" else padding + row)
        batch[key] = torch.tensor(rows, dtype=torch.long)
    for key in _SCALAR_KEYS:
        if key in features[0]:
            batch[key] = _scalars(features, key)
    return batch


def _scalars(features: Sequence[dict], key: str) -> torch.Tensor:
    values = [feature[key] for feature in features]
    dtype = torch.float32 if any(isinstance(value, float) for value in values) else torch.long
    return torch.tensor(values, dtype=dtype)


class PadCollator:
    """`pad_collate` with fixed options, picklable for DataLoader workers."""

    def __init__(self, pad_token_id: int, *, label_pad: int = IGNORE_INDEX, padding_side: str = "right",
                 pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.label_pad = label_pad
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        return pad_collate(features, pad_token_id=self.pad_token_id, label_pad=self.label_pad,
                           padding_side=self.padding_side, pad_to_multiple_of=self.pad_to_multiple_of)
