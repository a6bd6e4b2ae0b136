"""The result of encoding a task's examples: token features plus counts of what encoding had to cut."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

# label of positions the loss skips (PyTorch cross_entropy's default ignore_index)
IGNORE_INDEX = -100


@dataclass
class EncodedDataset:
    """A list of feature dicts (one per model input row) that a DataLoader can index.

    Each feature holds plain Python lists and ints ("input_ids", "labels", ...); `pad_collate` turns a batch
    of them into tensors. Besides the features it reports how many examples were truncated to fit
    `max_length` and how many were skipped (with the reason), so that a run can warn about them.
    """

    features: list[dict]
    num_examples: int = 0
    num_truncated: int = 0
    num_skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.features)

    @property
    def lengths(self) -> list[int]:
        """Token count of every feature (what LengthGroupedSampler groups by)."""
        return [feature["length"] if "length" in feature else len(feature["input_ids"]) for feature in self.features]

    def summary(self) -> str:
        """One line for logs: rows, examples, truncated and skipped counts."""
        text = f"{len(self.features)} rows from {self.num_examples} examples"
        if self.num_truncated:
            text += f", {self.num_truncated} truncated"
        if self.num_skipped:
            text += f", {self.num_skipped} skipped"
        return text
