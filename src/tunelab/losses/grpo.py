"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, sec. 4.1): the loss as pure tensor functions.

For each prompt q the policy samples a group of G completions o_1..o_G, each scored with a reward r_i.
Outcome supervision gives every token of o_i the same advantage, the reward normalised within its group
(eq. after 3, "outcome supervision"):

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)

std is the population standard deviation (divided by G), so a group's advantages have mean 0 and variance 1
(up to eps); a group whose rewards are all equal (std 0) gives every completion the advantage 0 exactly.
Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") drops the division: A_i = r_i - mean.

The objective per completion token t of o_i (eq. 3), with rho = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
the ratio to the policy that sampled the group:

    J_i,t = min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) - beta D_KL[pi_theta || pi_ref]

and the per-token KL divergence to the reference is Schulman's unbiased, always non-negative k3 estimator
(eq. 4), with delta = log pi_ref(o_t) - log pi_theta(o_t):

    D_KL = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1 = exp(delta) - delta - 1

The loss of a token is -J_i,t. With one optimisation step per sampled group (pi_old = pi_theta, taken as a
constant), rho = 1, its gradient is grad log pi_theta(o_t), and the loss reduces to the advantage-weighted
log-probability -A_i log pi_theta(o_t) (plus the KL term).

How the token losses are averaged (`normalization`, in `reduce_token_losses`):

    "token":    sum over every completion token of the batch / the number of those tokens (DAPO, Yu et al.
                2025): every token weighs the same, so long completions are not down-weighted;
    "sequence": each completion's mean over its tokens, then the mean over completions (eq. 3 as written:
                1/G sum_i 1/|o_i| sum_t);
    "constant": sum over every token / (completions x max_new_tokens) (Dr. GRPO): no length bias at all.

Every function returns sums with a count, like the other losses of this package: the trainer divides by the
count of the whole accumulated batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE = -100
NORMALIZATIONS = ("token", "sequence", "constant")


@dataclass
class GRPOOutput:
    """Per-token results [R, T] (zero where mask is false): losses (with gradient), and detached: kl (the k3
    estimate; zeros when there is no reference), ratio (rho) and clipped (where the clipped term was taken)."""

    losses: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Advantages [N] of rewards [N] laid out as consecutive groups of `group_size` completions of one prompt.

    A_i = (r_i - mean_group) / (std_group + eps), std the population standard deviation; scale=False (Dr. GRPO):
    A_i = r_i - mean_group. A group with equal rewards gives exactly 0 (it carries no learning signal).
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not make groups of {group_size}")
    groups = rewards.float().reshape(-1, group_size)  # [P, G]
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    centred = groups - mean
    advantages = centred / (std + eps) if scale else centred
    equal = (groups == groups[:, :1]).all(dim=1, keepdim=True)  # float rounding of the mean must not leak in
    return torch.where(equal, torch.zeros_like(advantages), advantages).reshape(-1)


def k3_kl(logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL[pi || pi_ref] estimate exp(delta) - delta - 1, delta = log pi_ref - log pi (Schulman 2020, k3;
    DeepSeekMath eq. 4). Non-negative, and 0 exactly where the two log-probabilities are equal."""
    delta = reference_logps - logps
    return torch.exp(delta) - delta - 1.0


def grpo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                      reference_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
                      epsilon_high: float | None = None) -> GRPOOutput:
    """The negated GRPO objective of every completion token (DeepSeekMath eq. 3), not reduced.

    logps [R, T]: log pi_theta of the completion tokens (with gradient); old_logps [R, T]: of the policy that
    sampled them (constants; pass logps.detach() for one step per group, then rho = 1); advantages [R]: one per
    completion; mask [R, T]: the completion's tokens; reference_logps [R, T]: pi_ref, for the KL term when
    beta > 0. epsilon_high (default epsilon) is the upper clip bound (DAPO's clip-higher when larger).
    """
    if logps.shape != old_logps.shape or logps.shape != mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)}: expected one per row, [{logps.shape[0]}]")
    if beta > 0 and reference_logps is None:
        raise ValueError("beta > 0 needs the reference log-probabilities")
    high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.bool()
    advantage = advantages.float()[:, None]  # [R, 1]: every token of a completion shares its advantage
    ratio = torch.exp(logps.float() - old_logps.float())  # rho [R, T]
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + high) * advantage
    objective = torch.minimum(unclipped, clipped)  # the pessimistic bound of PPO (Schulman et al. 2017, eq. 7)
    kl = torch.zeros_like(objective)
    if reference_logps is not None:
        kl = k3_kl(logps.float(), reference_logps.float())
        if beta > 0:
            objective = objective - beta * kl
    losses = torch.where(mask, -objective, torch.zeros_like(objective))
    was_clipped = mask & (clipped < unclipped)  # min() took the clipped term: no gradient through rho there
    zero = torch.zeros_like(ratio)
    return GRPOOutput(losses, torch.where(mask, kl, zero).detach(), torch.where(mask, ratio, zero).detach(),
                      was_clipped)


def reduce_token_losses(losses: torch.Tensor, mask: torch.Tensor, normalization: str = "token", *,
                        max_new_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """(summed loss, count) of per-token losses [R, T]; the mean is sum / count over the accumulated batch.

    token: (sum of every token, tokens); sequence: (sum of each row's token mean, rows); constant: (sum of every
    token, rows x max_new_tokens). See the module docstring.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r} (known: {', '.join(NORMALIZATIONS)})")
    mask = mask.bool()
    if normalization == "token":
        return losses.sum(), int(mask.sum())
    if normalization == "sequence":
        lengths = mask.sum(dim=1).clamp(min=1)  # [R]
        return (losses.sum(dim=1) / lengths).sum(), losses.shape[0]
    if max_new_tokens is None or max_new_tokens < 1:
        raise ValueError("normalization 'constant' needs max_new_tokens")
    return losses.sum(), losses.shape[0] * max_new_tokens


def token_logps(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], *,
                chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each labelled token [B, T-1] in float32, 0 elsewhere; the mask of labelled tokens [B, T-1]).

    hidden [B, T, D] at position t predicts labels[:, t + 1]; -100 marks a token that is not scored (the prompt,
    padding). Only positions with a target are projected to the vocabulary, `chunk_size` at a time, and with
    gradients each chunk's logits are recomputed in the backward pass: the [B, T, V] logits never exist at once.
    """
    targets = labels[:, 1:]  # [B, T-1]
    keep = targets != IGNORE
    out = hidden.new_zeros(targets.shape, dtype=torch.float32)
    if not bool(keep.any()):
        return out + hidden.sum() * 0.0, keep
    rows = hidden[:, :-1][keep]  # [N, D]
    flat = targets[keep]  # [N]
    pieces = []
    for start in range(0, rows.shape[0], chunk_size):
        h, y = rows[start:start + chunk_size], flat[start:start + chunk_size]
        if rows.shape[0] <= chunk_size or not torch.is_grad_enabled():
            pieces.append(_logps(h, y, head))
        else:
            pieces.append(torch.utils.checkpoint.checkpoint(_logps, h, y, head, use_reentrant=False))
    return out.masked_scatter(keep, torch.cat(pieces)), keep


def _logps(h: torch.Tensor, y: torch.Tensor, head) -> torch.Tensor:
    """log p(y_n) under head(h_n): [N]."""
    return -F.cross_entropy(head(h).float(), y, reduction="none")
