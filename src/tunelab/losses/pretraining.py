"""BERT's pretraining losses (Devlin et al. 2019, appendix A.2): masked LM and next-sentence prediction.

Both return the SUM over their targets and the number of targets; the trainer divides each objective by
its own targets over the whole accumulated batch (masked tokens for the MLM, examples for NSP), so the
training loss is mean masked-token CE + mean NSP CE, BERT's sum of the two means.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from tunelab.losses.cross_entropy import IGNORE, chunked_cross_entropy


def masked_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, int]:
    """CE of the original token at every masked position, summed: hidden [B, T, D], labels [B, T] (-100 where
    nothing was masked). Only the masked positions (about 15%) are projected to the vocabulary, in chunks."""
    keep = labels != IGNORE  # [B, T]
    count = int(keep.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    return chunked_cross_entropy(hidden[keep], labels[keep], head, chunk_size=chunk_size), count


def next_sentence_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """CE of IsNext (0) / NotNext (1), summed over examples: logits [B, 2], labels [B]."""
    return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())
