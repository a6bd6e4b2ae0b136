"""Model.set_gradient_checkpointing: the same loss and gradients as without (dropout included), less saved for
backward, names and weights unchanged, and plain forwards outside training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.models.bert import BertConfig
from tunelab.models.llama import LlamaConfig
from tunelab.models.registry import build_model

VOCAB = 64


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, attention_dropout=0.1)
    else:  # BERT: hidden and attention dropout 0.1
        config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                            max_position_embeddings=32)
    return build_model(config, ["lm" if family == "llama" else "mlm"])


def loss_grads_and_saved_bytes(model, ids):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(7)  # the same dropout masks for both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = next(iter(model(ids).logits.values()))
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients_with_less_saved(family):
    plain, checkpointed = tiny(family), tiny(family)
    names = [n for n, _ in checkpointed.named_parameters()]
    assert checkpointed.set_gradient_checkpointing(True) == 3
    assert [n for n, _ in checkpointed.named_parameters()] == names  # the blocks keep their names
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    plain.train(), checkpointed.train()
    loss, grads, plain_bytes = loss_grads_and_saved_bytes(plain, ids)
    loss_ckpt, grads_ckpt, ckpt_bytes = loss_grads_and_saved_bytes(checkpointed, ids)
    assert torch.equal(loss, loss_ckpt)
    assert sum(g is not None for g in grads) > 10
    for a, b in zip(grads, grads_ckpt):
        assert (a is None) == (b is None)  # e.g. BERT's pooler is not on the masked-LM path
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ckpt_bytes < 0.6 * plain_bytes

    checkpointed.eval()  # evaluation: the plain forward, nothing recomputed
    with torch.no_grad():
        torch.testing.assert_close(next(iter(checkpointed(ids).logits.values())),
                                   next(iter(plain.eval()(ids).logits.values())), rtol=0, atol=0)
    assert checkpointed.set_gradient_checkpointing(False) == 3
    assert all("forward" not in block.__dict__ for block in checkpointed.backbone.layers)
