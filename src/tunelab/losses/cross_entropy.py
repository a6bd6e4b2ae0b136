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
    """sum CE(head(rows), targets) over rows [N, D] and targets [N], `chunk_size` rows at a time.

    A plain linear head (an nn.Linear, e.g. a decoder's LM projection) goes through linear_cross_entropy: one
    pass over each chunk's logits gives the loss and its gradients. Any other head: each chunk's [chunk_size, V]
    logits are recomputed in the backward pass instead of being kept (with a single chunk there is nothing to
    gain: it is computed once, as usual)."""
    if plain_linear(head):
        return linear_cross_entropy(rows, head.weight, targets, chunk_size=chunk_size)
    if rows.shape[0] <= chunk_size:
        return _chunk_ce(rows, targets, head)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        h, y = rows[start : start + chunk_size], targets[start : start + chunk_size]
        total = total + torch.utils.checkpoint.checkpoint(_chunk_ce, h, y, head, use_reentrant=False)
    return total


def plain_linear(head) -> bool:
    """Whether `head` is a plain bias-free nn.Linear on a plain tensor, which the fused losses below take as
    its weight (an LM projection); anything else is called as a function."""
    return isinstance(head, torch.nn.Linear) and head.bias is None and type(head.weight.data) is torch.Tensor


def _logit_chunks(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
    """What the fused losses share: (compute dtype, accumulation dtype, weight and rows in the compute dtype,
    the chunks). The compute dtype is autocast's when autocast is on where this is called (as F.linear would
    compute), else the rows'; the accumulation dtype fp32 (fp64 for an fp64 model). Iterating the chunks (with
    autocast disabled) gives, `chunk_size` rows at a time, (rows slice, h, y, z = h W^T [c, V] in the
    accumulation dtype, logsumexp(z) [c])."""
    device_type = rows.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else rows.dtype
    acc = torch.promote_types(dtype, torch.float32)
    w = weight.to(dtype)  # [V, D]
    h_all = rows.to(dtype)  # [N, D]

    def chunks():
        for start in range(0, h_all.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            h, y = h_all[part], targets[part]
            z = (h @ w.t()).to(acc)  # [c, V]
            yield part, h, y, z, torch.logsumexp(z, dim=-1)

    return dtype, acc, w, h_all, chunks()


def _chunk_ce(h: torch.Tensor, y: torch.Tensor, head) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def linear_cross_entropy(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk_size: int = 1024) -> torch.Tensor:
    """sum_i CE(W h_i, y_i) over rows [N, D], weight [V, D] and targets [N], without keeping any logits.

    For each chunk of rows, z = h W^T is computed once (in the autocast dtype when autocast is on, as F.linear
    would) and the loss comes from it in fp32: CE = logsumexp(z) - z_y. Since the loss is a sum, its gradient
    with respect to z is already known in the forward pass, softmax(z) - onehot(y), so the gradients of h and
    W are formed there too (dh = dz W, dW += dz^T h) and the backward pass only scales them by the incoming
    gradient. Against checkpointed chunks through F.cross_entropy this skips the recomputed projection, the
    fp32 copy of the logits and the separate log-softmax backward: one pass over [chunk, V] instead of four.
    """
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(rows, weight, targets, chunk_size, grad and rows.requires_grad,
                                     grad and weight.requires_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, targets, chunk_size, need_rows, need_weight):
        dtype, acc, w, h_all, chunks = _logit_chunks(rows, weight, targets, chunk_size)
        with torch.autocast(rows.device.type, enabled=False):
            grad_rows = torch.empty_like(h_all) if need_rows else None
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
            total = torch.zeros((), dtype=acc, device=rows.device)
            for part, h, y, z, lse in chunks:
                total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
                if need_rows or need_weight:
                    z.sub_(lse[:, None]).exp_()  # softmax, in place
                    z[torch.arange(y.shape[0], device=y.device), y] -= 1.0  # d CE / d z
                    dz = z.to(dtype)
                    if need_rows:
                        grad_rows[part] = dz @ w
                    if need_weight:
                        grad_weight += dz.t() @ h
        ctx.save_for_backward(grad_rows, grad_weight)
        ctx.dtypes = (rows.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_rows, grad_weight = ctx.saved_tensors
        rows_dtype, weight_dtype = ctx.dtypes
        d_rows = (grad_rows * grad_total).to(rows_dtype) if grad_rows is not None else None
        d_weight = (grad_weight * grad_total).to(weight_dtype) if grad_weight is not None else None
        return d_rows, d_weight, None, None, None, None


def linear_token_logps(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(W h_n)[y_n] for each row n [N], over rows [N, D], a frozen weight [V, D] and targets [N],
    without keeping any logits (the sequence log-probabilities of DPO and its relatives under LoRA, whose LM
    head is frozen).

    Each chunk's z = h W^T is computed once, in the autocast dtype when autocast is on (as F.linear would),
    and log p_y = z_y - logsumexp(z) in fp32. The gradient of log p_y with respect to h_n is
    W^T (onehot(y_n) - softmax(z_n)), which does not depend on what comes after, so it is formed in the
    forward pass and the backward pass only scales each row by its incoming gradient. The weight gets no
    gradient: a trainable head goes through sequence_logps's checkpointed chunks instead."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("linear_token_logps needs a frozen weight (it forms no weight gradient)")
    return _LinearTokenLogps.apply(rows, weight, targets, chunk_size, torch.is_grad_enabled() and rows.requires_grad)


class _LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, targets, chunk_size, need_rows):
        dtype, acc, w, h_all, chunks = _logit_chunks(rows, weight, targets, chunk_size)
        with torch.autocast(rows.device.type, enabled=False):
            logps = torch.empty(h_all.shape[0], dtype=acc, device=rows.device)
            grad_rows = torch.empty_like(h_all) if need_rows else None
            for part, _, y, z, lse in chunks:
                logps[part] = z.gather(1, y[:, None]).squeeze(1) - lse
                if need_rows:
                    z.sub_(lse[:, None]).exp_().neg_()  # -softmax, in place
                    z[torch.arange(y.shape[0], device=y.device), y] += 1.0  # d log p_y / d z
                    grad_rows[part] = z.to(dtype) @ w
        ctx.save_for_backward(grad_rows)
        ctx.rows_dtype = rows.dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        (grad_rows,) = ctx.saved_tensors
        d_rows = None
        if grad_rows is not None:
            scale = grad_logps[:, None]  # fp32: each row's incoming gradient, applied at full precision
            d_rows = (grad_rows.to(torch.promote_types(grad_rows.dtype, scale.dtype)) * scale).to(ctx.rows_dtype)
        return d_rows, None, None, None, None


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
