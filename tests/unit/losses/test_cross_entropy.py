"""The chunked language-model losses equal F.cross_entropy over the full logits, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.losses.cross_entropy import chunked_cross_entropy, chunked_lm_loss, linear_cross_entropy


def _reference(rows, head, targets):
    logits = head(rows)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_linear_cross_entropy_equals_the_full_logits_loss_and_gradients(dtype, tolerance):
    torch.manual_seed(0)
    rows = torch.randn(2500, 32, dtype=dtype, requires_grad=True)  # 3 chunks of 1,024, the last one short
    head = torch.nn.Linear(32, 500, bias=False).to(dtype)
    targets = torch.randint(0, 500, (2500,))
    expected = _reference(rows, head, targets)
    want = torch.autograd.grad(expected * 0.5, (rows, head.weight))
    got_loss = linear_cross_entropy(rows, head.weight, targets, chunk_size=1024)
    got = torch.autograd.grad(got_loss * 0.5, (rows, head.weight))
    assert abs(got_loss.item() - expected.item()) <= tolerance * abs(expected.item())
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert (g - w).abs().max().item() <= tolerance * w.abs().max().item()


def test_linear_cross_entropy_under_bf16_autocast_is_within_bf16_rounding():
    torch.manual_seed(0)
    rows = torch.randn(600, 32, requires_grad=True)
    head = torch.nn.Linear(32, 300, bias=False)
    targets = torch.randint(0, 300, (600,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference(rows, head, targets)
        got_loss = linear_cross_entropy(rows, head.weight, targets, chunk_size=256)
    want = torch.autograd.grad(expected, (rows, head.weight))
    got = torch.autograd.grad(got_loss, (rows, head.weight))
    assert got_loss.dtype == torch.float32
    assert abs(got_loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert (g - w).abs().max().item() <= 2e-2 * w.abs().max().item()


def test_a_frozen_head_gets_no_gradient_and_the_rows_still_do():
    torch.manual_seed(0)
    rows = torch.randn(50, 16, requires_grad=True)
    head = torch.nn.Linear(16, 40, bias=False).requires_grad_(False)
    targets = torch.randint(0, 40, (50,))
    (grad,) = torch.autograd.grad(linear_cross_entropy(rows, head.weight, targets, chunk_size=16), (rows,))
    (want,) = torch.autograd.grad(_reference(rows, head, targets), (rows,))
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.isclose(linear_cross_entropy(rows, head.weight, targets), _reference(rows, head, targets))


def test_chunked_losses_take_the_fused_path_for_a_linear_head_and_the_same_values_for_any_head():
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, dtype=torch.float64)
    labels = torch.randint(0, 40, (3, 9))
    labels[0, :4] = -100
    head = torch.nn.Linear(16, 40, bias=False).to(torch.float64)
    fused, count = chunked_lm_loss(hidden, labels, head, chunk_size=5)
    composed, count2 = chunked_lm_loss(hidden, labels, lambda h: head(h), chunk_size=5)  # not an nn.Linear
    keep = labels[:, 1:] != -100
    expected = _reference(hidden[:, :-1][keep], head, labels[:, 1:][keep])
    assert count == count2 == int(keep.sum())
    assert abs(fused.item() - expected.item()) < 1e-10
    assert abs(composed.item() - expected.item()) < 1e-6 * expected.item()  # that path scores in fp32
    rows, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
    assert abs(chunked_cross_entropy(rows, targets, head, chunk_size=4).item() - expected.item()) < 1e-10


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_linear_token_logps_equal_the_full_log_softmax_and_its_gradient(dtype, tolerance):
    from tunelab.losses.cross_entropy import linear_token_logps

    torch.manual_seed(0)
    rows = torch.randn(2500, 32, dtype=dtype, requires_grad=True)  # 3 chunks of 1,024, the last one short
    head = torch.nn.Linear(32, 500, bias=False).to(dtype).requires_grad_(False)
    targets = torch.randint(0, 500, (2500,))
    weights = torch.randn(2500, dtype=dtype)  # a different incoming gradient for every row, as DPO's
    expected = F.log_softmax(head(rows), dim=-1).gather(1, targets[:, None]).squeeze(1)
    (want,) = torch.autograd.grad((expected * weights).sum(), (rows,))
    got = linear_token_logps(rows, head.weight, targets, chunk_size=1024)
    (grad,) = torch.autograd.grad((got * weights).sum(), (rows,))
    assert got.dtype == dtype and grad.dtype == dtype
    assert (got - expected).abs().max().item() <= tolerance * expected.abs().max().item()
    assert (grad - want).abs().max().item() <= tolerance * want.abs().max().item()
    with pytest.raises(ValueError, match="frozen weight"):
        linear_token_logps(rows, head.weight.clone().requires_grad_(), targets)


def test_sequence_logps_through_a_frozen_linear_head_equal_any_head():
    """The fused path (a frozen nn.Linear) and the generic one (any callable head) give the same sums and
    gradients, under bf16 autocast too."""
    from tunelab.losses.preference import sequence_logps

    torch.manual_seed(0)
    hidden = torch.randn(3, 20, 16, requires_grad=True)
    head = torch.nn.Linear(16, 40, bias=False).requires_grad_(False)
    labels = torch.randint(0, 40, (3, 20))
    labels[:, :7] = -100  # the prompt
    labels[2, 15:] = -100  # padding
    for autocast, tolerance in ((False, 1e-6), (True, 2e-2)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            fused, counts = sequence_logps(hidden, labels, head, chunk_size=16)
            generic, generic_counts = sequence_logps(hidden, labels, lambda h: head(h), chunk_size=16)
        assert torch.equal(counts, generic_counts) and counts.tolist() == [13, 13, 8]
        assert fused.dtype == torch.float32
        torch.testing.assert_close(fused, generic, rtol=tolerance, atol=tolerance)
        g1, g2 = (torch.autograd.grad((s * torch.tensor([1.0, -2.0, 0.5])).sum(), (hidden,))[0]
                  for s in (fused, generic))
        assert (g1 - g2).abs().max().item() <= tolerance * g2.abs().max().item()
