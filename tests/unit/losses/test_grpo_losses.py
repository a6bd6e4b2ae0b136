"""GRPO's loss (losses/grpo.py) against values worked out by hand: group advantages, the clipped surrogate, the
k3 KL term, and the three normalisations."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.losses import group_advantages, grpo_token_losses, k3_kl, reduce_token_losses, token_logps


def test_advantages_are_normalised_within_each_group():
    # group 1: rewards 0, 0, 1, 1 -> mean 0.5, population std 0.5 -> -1, -1, 1, 1 (up to eps)
    # group 2: rewards 1, 2, 3, 6 -> mean 3, std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5)
    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 3.0, 6.0])
    a = group_advantages(rewards, 4, eps=0.0)
    s = math.sqrt(3.5)
    expected = torch.tensor([-1.0, -1.0, 1.0, 1.0, -2 / s, -1 / s, 0.0, 3 / s])
    assert torch.allclose(a, expected, atol=1e-6)
    for group in a.reshape(2, 4):  # mean 0 and (population) variance 1 in each group
        assert abs(float(group.mean())) < 1e-6 and abs(float(group.var(unbiased=False)) - 1.0) < 1e-5
    with_eps = group_advantages(rewards[:4], 4, eps=1e-4)
    assert torch.allclose(with_eps, torch.tensor([-1.0, -1.0, 1.0, 1.0]) * 0.5 / (0.5 + 1e-4))


def test_dr_grpo_only_centres_and_equal_groups_give_zero():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.3, 0.3, 0.3, 0.3])
    a = group_advantages(rewards, 4, scale=False)
    assert torch.allclose(a[:4], torch.tensor([-2.0, -1.0, 0.0, 3.0]))
    # 0.3 * 4 / 4 is not exactly 0.3 in float32: an equal group must still give exactly 0, scaled or not
    assert torch.equal(a[4:], torch.zeros(4))
    assert torch.equal(group_advantages(rewards, 4)[4:], torch.zeros(4))
    assert torch.equal(group_advantages(torch.ones(6), 3), torch.zeros(6))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.ones(6), 4)


def test_k3_kl_by_hand_and_zero_when_equal():
    # pi = 0.5, pi_ref = 0.25: delta = log 0.5, exp(delta) - delta - 1 = 0.5 + ln 2 - 1
    kl = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert kl.item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-7)
    # pi = 0.25, pi_ref = 0.5: delta = ln 2, 2 - ln 2 - 1
    assert k3_kl(torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])).item() == pytest.approx(1 - math.log(2))
    logps = torch.randn(3, 5)
    assert torch.equal(k3_kl(logps, logps.clone()), torch.zeros(3, 5))


def _one_token(logp: float, old: float, advantage: float, **kw):
    return grpo_token_losses(torch.tensor([[logp]]), torch.tensor([[old]]), torch.tensor([advantage]),
                             torch.tensor([[True]]), **kw)


def test_clipped_surrogate_by_hand():
    # rho = 0.5 / 0.4 = 1.25 > 1 + 0.2
    up, old = math.log(0.5), math.log(0.4)
    out = _one_token(up, old, 1.0, epsilon=0.2)  # A > 0: min(1.25, 1.2) -> clipped at 1.2
    assert out.losses.item() == pytest.approx(-1.2) and out.clipped.item()
    assert out.ratio.item() == pytest.approx(1.25)
    out = _one_token(up, old, -1.0, epsilon=0.2)  # A < 0: min(-1.25, -1.2) = -1.25, not clipped
    assert out.losses.item() == pytest.approx(1.25) and not out.clipped.item()
    # rho = 0.3 / 0.4 = 0.75 < 1 - 0.2
    down = math.log(0.3)
    out = _one_token(down, old, -2.0, epsilon=0.2)  # A < 0: min(-1.5, 0.8 * -2 = -1.6) -> clipped
    assert out.losses.item() == pytest.approx(1.6) and out.clipped.item()
    out = _one_token(down, old, 2.0, epsilon=0.2)  # A > 0: min(1.5, 1.6) = 1.5, not clipped
    assert out.losses.item() == pytest.approx(-1.5) and not out.clipped.item()
    # clip-higher: epsilon_high 0.3 lets rho 1.25 through for A > 0
    out = _one_token(up, old, 1.0, epsilon=0.2, epsilon_high=0.3)
    assert out.losses.item() == pytest.approx(-1.25) and not out.clipped.item()


def test_clipped_tokens_have_no_gradient_and_unclipped_ones_do():
    logps = torch.tensor([[math.log(0.5), math.log(0.5)]], requires_grad=True)
    old = torch.tensor([[math.log(0.4), math.log(0.4)]])
    out = grpo_token_losses(logps, old, torch.tensor([1.0]), torch.tensor([[True, True]]), epsilon=0.2,
                            epsilon_high=0.3)
    out.losses.sum().backward()
    assert torch.allclose(logps.grad, torch.tensor([[-1.25, -1.25]]))  # d(-rho A)/d log pi = -rho A
    logps.grad = None
    out = grpo_token_losses(logps, old, torch.tensor([1.0]), torch.tensor([[True, True]]), epsilon=0.2)
    out.losses.sum().backward()
    assert torch.equal(logps.grad, torch.zeros(1, 2))  # clipped at 1.2: constant


def test_one_step_per_group_is_the_advantage_weighted_log_prob():
    """pi_old = pi_theta (detached): rho = 1, the loss is -A and its gradient that of -A log pi."""
    logps = torch.tensor([[-0.7, -1.2, 0.0], [-2.0, -0.1, -0.3]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    advantages = torch.tensor([1.5, -0.5])
    out = grpo_token_losses(logps, logps.detach(), advantages, mask)
    assert torch.allclose(out.ratio[mask], torch.ones(5)) and not out.clipped.any()
    assert torch.allclose(out.losses, torch.tensor([[-1.5, -1.5, 0.0], [0.5, 0.5, 0.5]]))
    out.losses.sum().backward()
    reference = logps.detach().clone().requires_grad_(True)
    (-(advantages[:, None] * reference) * mask).sum().backward()
    assert torch.allclose(logps.grad, reference.grad)


def test_kl_penalty_is_added_with_weight_beta():
    logps = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    mask = torch.tensor([[True, True]])
    out = grpo_token_losses(logps, logps, torch.tensor([0.0]), mask, reference_logps=ref, beta=0.1)
    kl = torch.tensor([[0.5 + math.log(2) - 1, 1 - math.log(2)]])
    assert torch.allclose(out.kl, kl, atol=1e-6)
    assert torch.allclose(out.losses, 0.1 * kl, atol=1e-6)  # A = 0: only the penalty, -(0 - beta KL)
    out = grpo_token_losses(logps, logps, torch.tensor([2.0]), mask, reference_logps=ref, beta=0.1)
    assert torch.allclose(out.losses, -2.0 + 0.1 * kl, atol=1e-6)
    # beta 0: KL measured but not in the loss; beta > 0 without a reference is an error
    out = grpo_token_losses(logps, logps, torch.tensor([2.0]), mask, reference_logps=ref, beta=0.0)
    assert torch.allclose(out.losses, torch.full((1, 2), -2.0)) and torch.allclose(out.kl, kl, atol=1e-6)
    with pytest.raises(ValueError, match="reference"):
        grpo_token_losses(logps, logps, torch.tensor([2.0]), mask, beta=0.1)


def test_normalisations_by_hand():
    losses = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    total, count = reduce_token_losses(losses, mask, "token")
    assert (float(total), count) == (15.0, 6)  # 1 + 2 + 4 x 3; every token weighs 1/6
    total, count = reduce_token_losses(losses, mask, "sequence")
    assert (float(total), count) == (1.5 + 3.0, 2)  # each completion's mean, then the mean of completions
    total, count = reduce_token_losses(losses, mask, "constant", max_new_tokens=8)
    assert (float(total), count) == (15.0, 16)
    with pytest.raises(ValueError, match="max_new_tokens"):
        reduce_token_losses(losses, mask, "constant")


def test_token_logps_match_log_softmax_and_keep_their_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, 1, 2, 9]])
    logps, mask = token_logps(hidden, labels, head, chunk_size=3)  # several chunks, recomputed in backward
    full = torch.log_softmax(head(hidden), dim=-1)  # [B, T, V]
    expected = torch.zeros(2, 4)
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] != -100:
                expected[b, t] = full[b, t, labels[b, t + 1]]
    assert torch.equal(mask, labels[:, 1:] != -100)
    assert torch.allclose(logps, expected, atol=1e-6)
    logps.sum().backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    expected.sum().backward()
    assert torch.allclose(grad, hidden.grad, atol=1e-6)
