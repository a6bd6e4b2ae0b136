"""The preference losses against values worked out by hand for fixed log-probabilities.

Identities used below: -log sigma(z) = log(1 + e^-z); log(1 + e) = 1 + log(1 + e^-1).
"""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.losses import (bradley_terry_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss, sequence_logps,
                            simpo_loss)

T = torch.tensor


def softplus(z: float) -> float:
    """-log sigma(-z) = log(1 + e^z)."""
    return math.log1p(math.exp(z))


# two pairs: (policy chosen, policy rejected, reference chosen, reference rejected)
#   pair 1: log-ratios chosen -10 - -11 = +1, rejected -12 - -11 = -1, h = 2
#   pair 2: log-ratios chosen  -5 -  -5 =  0, rejected  -4 -  -5 = +1, h = -1
PC, PR, RC, RR = T([-10.0, -5.0]), T([-12.0, -4.0]), T([-11.0, -5.0]), T([-11.0, -5.0])


def test_dpo_sigmoid():
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    # beta h = 0.5 * 2 = 1 -> -log sigma(1) = log(1 + e^-1) = 0.313261687518
    # beta h = 0.5 * -1 = -0.5 -> -log sigma(-0.5) = log(1 + e^0.5) = 0.974076984180
    assert out.losses.tolist() == pytest.approx([0.3132616875182228, 0.9740769841801067], abs=1e-6)
    # rewards beta * log-ratio: pair 1: 0.5 * 1, 0.5 * -1; pair 2: 0, 0.5 * 1
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 0.5])
    assert out.margins.tolist() == pytest.approx([1.0, -0.5])


def test_conservative_dpo():
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    # pair 1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9 * 0.3132617 + 0.1 * (1 + 0.3132617) = 0.4132617
    # pair 2: 0.9 * log(1 + e^0.5) + 0.1 * log(1 + e^-0.5) = 0.9 * 0.9740770 + 0.1 * 0.4740770 = 0.9240770
    assert out.losses.tolist() == pytest.approx([0.4132616875182228, 0.9240769841801067], abs=1e-6)
    assert 0.9 * softplus(-1) + 0.1 * softplus(1) == pytest.approx(0.4132616875182228)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)


def test_ipo():
    # tau = 0.5: target gap 1 / (2 tau) = 1: (2 - 1)^2 = 1, (-1 - 1)^2 = 4
    assert ipo_loss(PC, PR, RC, RR, beta=0.5).losses.tolist() == pytest.approx([1.0, 4.0])
    # tau = 0.25: target gap 2: (2 - 2)^2 = 0, (-1 - 2)^2 = 9
    out = ipo_loss(PC, PR, RC, RR, beta=0.25)
    assert out.losses.tolist() == pytest.approx([0.0, 9.0])
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, 0.0])


def test_simpo():
    # chosen: -10 over 5 tokens -> beta / |y| log pi = 2 * -2 = -4; rejected: -12 over 4 tokens -> 2 * -3 = -6
    # -log sigma(-4 - -6 - gamma) with gamma 1 = -log sigma(1) = 0.3132617
    out = simpo_loss(T([-10.0]), T([-12.0]), T([5]), T([4]), beta=2.0, gamma=1.0)
    assert out.losses.tolist() == pytest.approx([0.3132616875182228], abs=1e-6)
    assert out.chosen_rewards.tolist() == [-4.0] and out.rejected_rewards.tolist() == [-6.0]
    # gamma 0: -log sigma(2) = log(1 + e^-2) = 0.1269280
    assert simpo_loss(T([-10.0]), T([-12.0]), T([5]), T([4]), beta=2.0, gamma=0.0).losses.item() == \
        pytest.approx(0.12692801104297263, abs=1e-6)


def test_orpo():
    # chosen: 3 tokens of probability 1/2 -> log P = ln 0.5, odds = 0.5 / 0.5 = 1, log odds = 0
    # rejected: 2 tokens of probability 1/5 -> log P = ln 0.2, odds = 0.2 / 0.8 = 1/4, log odds = -ln 4
    # log odds ratio = ln 4 -> sigma(ln 4) = 4 / 5 -> L_OR = -ln 0.8 = 0.2231436
    # L_SFT = -ln 0.5 = 0.6931472; L = 0.6931472 + 0.1 * 0.2231436 = 0.7154615
    out = orpo_loss(T([3 * math.log(0.5)]), T([2 * math.log(0.2)]), T([3]), T([2]), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(2) - 0.1 * math.log(0.8), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.7154615, abs=1e-6)
    assert out.terms["log_odds_ratio"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert out.terms["nll"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(math.log(0.5)) and out.rejected_rewards.item() == pytest.approx(math.log(0.2))


def test_kto():
    # mismatched pairs: log-ratios -3 - -4 = 1 and -4 - -4 = 0 -> z0 = mean = 0.5
    kl_policy, kl_reference = T([-3.0, -4.0], requires_grad=True), T([-4.0, -4.0])
    # desirable, r = -8.5 - -10 = 1.5: v = sigma(1 * (1.5 - 0.5)) = sigma(1); loss = 1 - sigma(1) = sigma(-1) = 0.2689414
    # undesirable, r = -9.5 - -10 = 0.5: v = sigma(1 * (0.5 - 0.5)) = 0.5; loss = 1 - 0.5 = 0.5
    policy = T([-8.5, -9.5], requires_grad=True)
    out = kto_loss(policy, T([-10.0, -10.0]), T([True, False]), kl_policy, kl_reference, beta=1.0)
    assert out.kl.item() == pytest.approx(0.5)
    assert out.losses.tolist() == pytest.approx([0.2689414213699951, 0.5], abs=1e-6)
    assert out.rewards.tolist() == pytest.approx([1.5, 0.5])
    # z0 is not back-propagated through (Ethayarajh et al. 2024, sec. 4.1)
    out.losses.sum().backward()
    assert kl_policy.grad is None and policy.grad is not None
    # weights: lambda_D = 1.5 -> 1.5 * sigma(-1) = 0.4034121; lambda_U = 2 -> 2 - 2 * 0.5 = 1
    weighted = kto_loss(T([-8.5, -9.5]), T([-10.0, -10.0]), T([True, False]), T([-3.0, -4.0]), T([-4.0, -4.0]),
                        beta=1.0, desirable_weight=1.5, undesirable_weight=2.0)
    assert weighted.losses.tolist() == pytest.approx([1.5 * 0.2689414213699951, 1.0], abs=1e-6)
    # a negative KL estimate is clamped to 0: mismatched log-ratios -1 and -1 -> z0 = 0;
    # desirable r = 1.5 -> loss sigma(-1.5) = 0.1824255
    clamped = kto_loss(T([-8.5]), T([-10.0]), T([True]), T([-5.0, -5.0]), T([-4.0, -4.0]), beta=1.0)
    assert clamped.kl.item() == 0.0 and clamped.losses.item() == pytest.approx(0.18242552380635635, abs=1e-6)


def test_bradley_terry():
    # pair 1: r_w - r_l = 2 - 0.5 = 1.5 -> log(1 + e^-1.5) = 0.2014133; pair 2: 0 - 1 = -1 -> log(1 + e) = 1.3132617
    out = bradley_terry_loss(T([2.0, 0.0]), T([0.5, 1.0]))
    assert out.losses.tolist() == pytest.approx([0.2014132779827524, 1.3132616875182228], abs=1e-6)
    assert out.margins.tolist() == pytest.approx([1.5, -1.0])
    # a margin of 0.5: 1.5 - 0.5 = 1 -> log(1 + e^-1) = 0.3132617
    assert bradley_terry_loss(T([2.0]), T([0.5]), margin=0.5).losses.item() == pytest.approx(0.3132616875182228)


def test_sequence_logps_by_hand():
    # vocabulary of 2, the head is the identity: logits = hidden
    # row 0: position 0 has logits (0, 0) -> log p(1) = ln 1/2; position 1 has (ln 3, 0) -> log p(0) = ln 3/4
    # labels [-100, 1, 0]: position t scores labels[t + 1] -> ln 0.5 + ln 0.75 = ln 0.375
    # row 1: nothing labelled -> 0 over 0 tokens
    hidden = T([[[0.0, 0.0], [math.log(3), 0.0], [5.0, 5.0]], [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])
    labels = T([[-100, 1, 0], [-100, -100, -100]])
    sums, counts = sequence_logps(hidden, labels, torch.nn.Identity())
    assert sums.tolist() == pytest.approx([math.log(0.375), 0.0], abs=1e-6)
    assert counts.tolist() == [2, 0]


def test_sequence_logps_chunks_give_the_same_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    whole, counts = sequence_logps(hidden, labels, head)
    (grad_whole,) = torch.autograd.grad(whole.sum(), hidden)
    chunked, _ = sequence_logps(hidden, labels, head, chunk_size=4)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)
    assert counts.tolist() == [4, 6, 4]  # targets are labels[:, 1:]: row 0 loses 2 of 6, row 2 loses 2
    # the same as log_softmax over the full logits, gathered
    logp = head(hidden).log_softmax(-1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(whole, (logp * (labels[:, 1:] != -100)).sum(1))
