"""Learning from preferences: DPO and its relatives, KTO, and the Bradley-Terry reward-model loss.

Every function takes per-sequence log-probabilities (the sum over a response's tokens of
log pi(y_t | x, y_<t), as `sequence_logps` computes them) or reward-model scores, one value per pair or
example, and returns the UNREDUCED loss of each pair [B] with the rewards that evaluation reports
(detached): the caller sums the losses and divides by the pairs of the whole accumulated batch, as for
every loss of this package.

Notation: pi is the policy being trained, pi_ref the frozen reference, y_w the chosen (preferred)
response and y_l the rejected one, sigma the logistic function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from tunelab.losses.cross_entropy import linear_token_logps, plain_linear

IGNORE = -100


@dataclass
class PreferenceOutput:
    """losses [B] (one per pair, not reduced); chosen_rewards / rejected_rewards [B] (detached) are the rewards
    whose order and difference evaluation reports; terms: parts of the loss by name ([B] each, detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def margins(self) -> torch.Tensor:
        """chosen - rejected reward of each pair [B]."""
        return self.chosen_rewards - self.rejected_rewards


@dataclass
class KTOOutput:
    """losses [B] and rewards [B] (beta * log pi / pi_ref, detached) of single examples; kl: the reference point z0."""

    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


def _check_same_shape(*tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"per-pair inputs must have the same shape, got {sorted(shapes)}")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor, *,
             beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceOutput:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), conservative with label_smoothing.

        h = log pi(y_w|x) / pi_ref(y_w|x) - log pi(y_l|x) / pi_ref(y_l|x)
        L_DPO = -log sigma(beta h)

    The implicit reward is r(x, y) = beta log pi(y|x) / pi_ref(y|x) (eq. 5, up to a term of x alone).
    Conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences") assumes each label is
    flipped with probability eps = label_smoothing:

        L_cDPO = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    """
    _check_same_shape(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing (cDPO's flip probability) must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen_logps - reference_chosen_logps  # log pi / pi_ref of y_w  [B]
    rejected_ratio = policy_rejected_logps - reference_rejected_logps  # of y_l  [B]
    logits = beta * (chosen_ratio - rejected_ratio)  # beta h  [B]
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor, *,
             beta: float = 0.1) -> PreferenceOutput:
    """Identity Preference Optimisation (Azar et al. 2023, "A general theoretical paradigm...", eq. 17).

        h = log pi(y_w|x) / pi_ref(y_w|x) - log pi(y_l|x) / pi_ref(y_l|x)
        L_IPO = (h - 1 / (2 tau))^2,        tau = beta

    A squared loss that regresses the log-ratio gap to 1 / (2 tau) instead of pushing it to infinity, so it
    does not overfit deterministic preferences. The rewards reported are DPO's, beta log pi / pi_ref.
    """
    _check_same_shape(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    if beta <= 0:
        raise ValueError(f"IPO's tau (beta) must be positive, got {beta}")
    chosen_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_ratio = policy_rejected_logps - reference_rejected_logps
    h = chosen_ratio - rejected_ratio  # [B]
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return PreferenceOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, *,
               beta: float = 2.0, gamma: float = 1.0) -> PreferenceOutput:
    """Simple Preference Optimization (Meng et al. 2024, eq. 6): reference-free, length-normalised.

        r(x, y) = beta / |y| log pi(y|x)                                   (eq. 4)
        L_SimPO = -log sigma(r(x, y_w) - r(x, y_l) - gamma)

    |y| is the response's token count; gamma is the target reward margin.
    """
    _check_same_shape(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)  # [B]
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return PreferenceOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, *,
              beta: float = 0.1) -> PreferenceOutput:
    """Odds Ratio Preference Optimization (Hong et al. 2024, eqs. 1-7): SFT plus an odds-ratio term, no reference.

        log P(y|x) = 1/|y| sum_t log pi(y_t | x, y_<t)                   (eq. 1: length-normalised)
        odds(y|x) = P(y|x) / (1 - P(y|x))                                 (eq. 4)
        L_OR = -log sigma(log odds(y_w|x) - log odds(y_l|x))              (eq. 7)
        L_ORPO = L_SFT + lambda L_OR,  L_SFT = -log P(y_w|x),  lambda = beta      (eq. 6)

    log odds = log P - log(1 - P) is computed as log P - log1p(-exp(log P)), stable for log P < 0. The
    rewards reported are the length-normalised log-probabilities log P(y|x): their order is the order of
    the odds. terms: "nll" (L_SFT) and "log_odds_ratio" (log odds(y_w) - log odds(y_l)).
    """
    _check_same_shape(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    chosen_mean = policy_chosen_logps / chosen_lengths.clamp(min=1)  # log P(y_w|x)  [B]
    rejected_mean = policy_rejected_logps / rejected_lengths.clamp(min=1)
    log_odds = _log_odds(chosen_mean) - _log_odds(rejected_mean)  # [B]
    nll = -chosen_mean
    losses = nll - beta * F.logsigmoid(log_odds)
    return PreferenceOutput(losses, chosen_mean.detach(), rejected_mean.detach(),
                            {"nll": nll.detach(), "log_odds_ratio": log_odds.detach()})


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) from log P < 0; P is clamped below 1 so the log stays finite."""
    mean_logp = mean_logp.clamp(max=-1e-6)
    return mean_logp - torch.log1p(-torch.exp(mean_logp))


def kto_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor,
             policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOOutput:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, eq. 8) on single, labelled examples.

        r(x, y) = log pi(y|x) / pi_ref(y|x)
        z0 = KL(pi(y'|x) || pi_ref(y'|x))
        v(x, y) = lambda_D sigma(beta (r(x, y) - z0))    if y is desirable for x
                  lambda_U sigma(beta (z0 - r(x, y)))    if y is undesirable
        L_KTO = E[lambda_y - v(x, y)]

    z0, the reference point, is estimated as in sec. 4.1 of the paper: the mean log-ratio of mismatched
    pairs (x_i, y'_j), j != i (policy_kl_logps, reference_kl_logps [M]), clamped at 0 and not
    back-propagated through. desirable [B] is a bool tensor; the rewards are beta r(x, y).
    """
    _check_same_shape(policy_logps, reference_logps, desirable)
    _check_same_shape(policy_kl_logps, reference_kl_logps)
    desirable = desirable.bool()
    kl = (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()  # z0 (scalar)
    ratio = policy_logps - reference_logps  # r(x, y)  [B]
    weights = torch.where(desirable, torch.full_like(ratio, desirable_weight), torch.full_like(ratio, undesirable_weight))
    value = torch.where(desirable, torch.sigmoid(beta * (ratio - kl)), torch.sigmoid(beta * (kl - ratio)))
    losses = weights * (1.0 - value)  # lambda_y - v(x, y), with v = lambda_y sigma(...)
    return KTOOutput(losses, (beta * ratio).detach(), kl)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *,
                       margin: torch.Tensor | float | None = None) -> PreferenceOutput:
    """The reward-model loss of a Bradley-Terry preference model (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1):

        P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)),     L = -log sigma(r(x, y_w) - r(x, y_l) - m)

    with an optional margin m (0 in InstructGPT; a per-pair margin in Touvron et al. 2023, eq. 2).
    Scores [B] are the reward model's scalar outputs; they are the rewards reported.
    """
    _check_same_shape(chosen_scores, rejected_scores)
    difference = chosen_scores.float() - rejected_scores.float()
    if margin is not None:
        difference = difference - margin
    return PreferenceOutput(-F.logsigmoid(difference), chosen_scores.detach().float(), rejected_scores.detach().float())


def sequence_logps(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], *,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the labelled tokens' log-probabilities [B] in float32, labelled tokens [B]) of each row.

    hidden [B, T, D] at position t predicts labels[:, t + 1] (the shift happens here, as in chunked_lm_loss);
    -100 marks a token that is not scored (the prompt, padding). Only positions with a target are projected
    to the vocabulary, `chunk_size` rows at a time, and each chunk's logits are recomputed in the backward
    pass, so the [B, T, V] logits never exist at once.
    """
    targets = labels[:, 1:]  # [B, T-1]
    keep = targets != IGNORE
    counts = keep.sum(dim=1)  # [B]
    sums = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    if not bool(keep.any()):
        return sums + hidden.sum() * 0.0, counts
    rows = hidden[:, :-1][keep]  # [N, D]
    flat_targets = targets[keep]  # [N]
    row_of = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(targets)[keep]  # [N]
    if plain_linear(head) and not head.weight.requires_grad:  # a frozen LM projection (LoRA): fused, no logits
        return sums.index_add(0, row_of, linear_token_logps(rows, head.weight, flat_targets,
                                                            chunk_size=chunk_size)), counts
    pieces = []
    for start in range(0, rows.shape[0], chunk_size):
        h, y = rows[start : start + chunk_size], flat_targets[start : start + chunk_size]
        if rows.shape[0] <= chunk_size or not torch.is_grad_enabled():
            pieces.append(_token_logps(h, y, head))
        else:
            pieces.append(torch.utils.checkpoint.checkpoint(_token_logps, h, y, head, use_reentrant=False))
    return sums.index_add(0, row_of, torch.cat(pieces)), counts


def _token_logps(h: torch.Tensor, y: torch.Tensor, head) -> torch.Tensor:
    """log p(y_n) under head(h_n) for each row n: [N]."""
    return -F.cross_entropy(head(h).float(), y, reduction="none")
