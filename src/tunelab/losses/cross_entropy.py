"""Cross-entropy losses for classification, tagging, extractive QA and language modelling."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE = -100


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed CE over examples: logits [B, C], labels [B]."""
    return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed CE over labelled tokens (label -100 ignored): logits [B, T, C], labels [B, T]."""
    count = int((labels != IGNORE).sum())
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, count


def span_loss(logits: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Extractive QA: (CE(start) + CE(end)) / 2 summed over examples (Devlin et al. 2019, sec. 4.2).

    logits [B, T, 2]; start, end [B] token positions (clamped into the sequence, as positions past it
    mean the answer was truncated away).
    """
    T = logits.shape[1]
    start, end = start.clamp(0, T - 1), end.clamp(0, T - 1)
    start_logits, end_logits = logits.float().unbind(dim=-1)  # [B, T] each
    loss = F.cross_entropy(start_logits, start, reduction="sum") + F.cross_entropy(end_logits, end, reduction="sum")
    return loss / 2, int(start.numel())


def chunked_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, int]:
    """Next-token CE summed over targets, never materialising [B, T, V] logits.

    hidden [B, T, D] predicts labels shifted by one: position t is scored against labels[:, t + 1].
    Only positions with a target are projected to the vocabulary, `chunk_size` rows at a time, and
    each chunk's logits are recomputed in the backward pass (checkpointing), so peak memory holds one
    chunk of [chunk_size, V] logits instead of the whole batch's.
    """
    targets = labels[:, 1:]  # [B, T-1]
    keep = targets != IGNORE
    count = int(keep.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    rows = hidden[:, :-1][keep]  # [N, D]: only positions that have a target
    return chunked_cross_entropy(rows, targets[keep], head, chunk_size=chunk_size), count


def chunked_cross_entropy(
    rows: torch.Tensor, targets: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], *, chunk_size: int = 1024
) -> torch.Tensor:
    """sum CE(head(rows), targets) over rows [N, D] and targets [N], `chunk_size` rows at a time; each chunk's
    [chunk_size, V] logits are recomputed in the backward pass instead of being kept (with a single chunk
    there is nothing to gain: it is computed once, as usual)."""
    if rows.shape[0] <= chunk_size:
        return _chunk_ce(rows, targets, head)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        h, y = rows[start : start + chunk_size], targets[start : start + chunk_size]
        total = total + torch.utils.checkpoint.checkpoint(_chunk_ce, h, y, head, use_reentrant=False)
    return total


def _chunk_ce(h: torch.Tensor, y: torch.Tensor, head) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def chunked_token_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    label_smoothing: float = 0.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, int]:
    """CE of aligned targets summed over them, never materialising [B, T, V] logits (encoder-decoders).

    hidden [B, T, D] at position t is scored against labels[:, t] (no shift: a seq2seq decoder's inputs are
    already the targets shifted right). Positions labelled -100 are skipped before the projection, and each
    chunk's logits are recomputed in the backward pass, as in chunked_lm_loss (keeping them instead was not
    faster: measured on Multi30k batches of ~2,000 target tokens over 8,000 ids).

    label_smoothing eps (Szegedy et al. 2016; eps = 0.1 in Vaswani et al. 2017, sec. 5.4) trains against
    (1 - eps) one-hot + eps / V uniform: loss = (1 - eps) * CE + eps * mean over classes of -log p.
    """
    keep = labels != IGNORE
    count = int(keep.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    rows, flat_targets = hidden[keep], labels[keep]  # [N, D], [N]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        h, y = rows[start : start + chunk_size], flat_targets[start : start + chunk_size]
        total = total + torch.utils.checkpoint.checkpoint(
            _smoothed_chunk_ce, h, y, head, label_smoothing, use_reentrant=False
        )
    return total, count


def _smoothed_chunk_ce(h: torch.Tensor, y: torch.Tensor, head, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum", label_smoothing=label_smoothing)
