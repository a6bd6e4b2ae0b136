"""Recurrent LMs (models/rnn.py): shapes, tied weights, the LSTM gates, state carried across chunks, padding,
dropout masks, learning, save / load, generation and errors. Tiny random models built in code."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

import tunelab
from tunelab.errors import CheckpointError
from tunelab.models import RNNConfig, build_model
from tunelab.models.registry import config_from_architecture
from tunelab.models.rnn import SequenceDropout, detach_state, state_from_tensors, state_to_tensors
from tunelab.tokenizer import Tokenizer

VOCAB = 40
CELLS = ("lstm", "gru", "rnn")


def tiny(cell: str = "lstm", heads=("lm",), seed: int = 0, **fields):
    torch.manual_seed(seed)
    config = RNNConfig(vocab_size=VOCAB, hidden_size=12, embedding_size=8, num_layers=2, cell=cell,
                       labels=["neg", "pos"], **fields)
    return build_model(config, heads)


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cell", CELLS)
def test_shapes_state_and_tied_output_layer(cell):
    model = tiny(cell).eval()
    out = model(ids(3, 7))
    assert out.hidden.shape == (3, 7, 8)  # projected from the 12-wide layers to the 8-wide embeddings
    assert out.logits["lm"].shape == (3, 7, VOCAB)
    assert len(out.state) == 2
    assert all(t.shape == (1, 3, 12) for layer in out.state for t in layer)
    assert len(out.state[0]) == (2 if cell == "lstm" else 1)
    assert model.heads["lm"].proj.weight is model.backbone.tok_embeddings.weight
    # one tensor: a gradient step through the output layer moves the embeddings
    out.logits["lm"].sum().backward()
    assert model.backbone.tok_embeddings.weight.grad.abs().sum() > 0


def test_projection_only_when_tied_and_sizes_differ():
    assert tiny().backbone.out_proj is not None
    equal = build_model(RNNConfig(vocab_size=VOCAB, hidden_size=8, num_layers=1), ["lm"])
    assert equal.backbone.out_proj is None and equal.config.output_size == 8
    untied = build_model(RNNConfig(vocab_size=VOCAB, hidden_size=12, embedding_size=8, num_layers=1,
                                   tie_embeddings=False), ["lm"])
    assert untied.backbone.out_proj is None and untied.config.output_size == 12
    assert untied.heads["lm"].proj.weight.shape == (VOCAB, 12)
    assert untied.heads["lm"].proj.weight is not untied.backbone.tok_embeddings.weight


def test_lstm_layer_is_the_gate_equations_of_the_docstring():
    model = tiny("lstm").eval()
    layer = model.backbone.layers[0]
    x = torch.randn(2, 8)
    h0, c0 = torch.randn(2, 12), torch.randn(2, 12)
    gates = x @ layer.weight_ih_l0.T + layer.bias_ih_l0 + h0 @ layer.weight_hh_l0.T + layer.bias_hh_l0
    i, f, g, o = gates.chunk(4, dim=-1)
    c1 = torch.sigmoid(f) * c0 + torch.sigmoid(i) * torch.tanh(g)
    h1 = torch.sigmoid(o) * torch.tanh(c1)
    out, (h, c) = layer(x[:, None], (h0[None], c0[None]))
    assert torch.allclose(out[:, 0], h1, atol=1e-6) and torch.allclose(c[0], c1, atol=1e-6)
    # the forget-gate bias starts at 1 (Jozefowicz et al. 2015)
    assert torch.all(layer.bias_ih_l0[12:24] == 1.0) and torch.all(layer.bias_hh_l0[12:24] == 0.0)


@pytest.mark.parametrize("cell", CELLS)
def test_chunks_with_the_state_carried_equal_one_long_forward(cell):
    model = tiny(cell).eval()
    x = ids(3, 20)
    with torch.no_grad():
        whole = model(x)
        state, pieces = None, []
        for start in (0, 7, 9, 16):  # uneven chunks: 7, 2, 7, 4 tokens
            stop = {0: 7, 7: 9, 9: 16, 16: 20}[start]
            out = model(x[:, start:stop], state=state)
            pieces.append(out.logits["lm"])
            state = out.state
    chunked = torch.cat(pieces, dim=1)
    assert torch.allclose(chunked, whole.logits["lm"], atol=1e-5), (chunked - whole.logits["lm"]).abs().max()
    for a, b in zip(state, whole.state):
        for t, u in zip(a, b):
            assert torch.allclose(t, u, atol=1e-6)
    # and without the state the second chunk is different: the state carries real information
    with torch.no_grad():
        cold = model(x[:, 7:9]).logits["lm"]
    assert (cold - whole.logits["lm"][:, 7:9]).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_the_rows_alone(side):
    model = tiny("lstm", heads=("lm", "classifier")).eval()
    rows = [ids(1, n, seed=n)[0] for n in (6, 3, 5)]
    batch = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for r, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(6 - len(row), 6)
        batch[r, where], mask[r, where] = row, 1
    with torch.no_grad():
        padded = model(batch, mask)
        for r, row in enumerate(rows):
            alone = model(row[None])
            where = slice(0, len(row)) if side == "right" else slice(6 - len(row), 6)
            assert torch.allclose(padded.logits["lm"][r, where], alone.logits["lm"][0], atol=1e-6)
            assert torch.allclose(padded.logits["classifier"][r], alone.logits["classifier"][0], atol=1e-6)
            for a, b in zip(padded.state, alone.state):  # the state after each row's last real token
                assert torch.allclose(a[0][:, r], b[0][:, 0], atol=1e-6)


def test_a_mask_with_a_hole_is_an_error():
    model = tiny().eval()
    mask = torch.tensor([[1, 0, 1, 1]])
    with pytest.raises(ValueError, match="contiguous"):
        model(ids(1, 4), mask)


def test_variational_dropout_reuses_one_mask_over_time_and_embedding_dropout_drops_whole_words():
    torch.manual_seed(0)
    x = torch.ones(4, 9, 16)
    locked = SequenceDropout(0.5, variational=True).train()(x)
    assert torch.equal(locked, locked[:, :1].expand_as(locked))  # the same mask at every step
    assert set(locked.unique().tolist()) == {0.0, 2.0}
    free = SequenceDropout(0.5, variational=False).train()(x)
    assert not torch.equal(free, free[:, :1].expand_as(free))
    assert torch.equal(SequenceDropout(0.5, variational=True).eval()(x), x)

    model = tiny(embedding_dropout=0.5).train()
    words = torch.tensor([[3, 5, 3, 7, 5, 3, 7, 9]])
    embedded = model.backbone.embed(words)[0]  # [T, E]
    dropped = (embedded == 0).all(dim=-1)
    for word in (3, 5, 7):
        positions = (words[0] == word).nonzero().flatten()
        assert len(set(dropped[positions].tolist())) == 1  # a word is dropped everywhere or nowhere
    assert torch.equal(model.eval().backbone.embed(words), model.backbone.tok_embeddings(words))


def _train(model, batches, head, steps=60, lr=1e-2):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y, mask = batches[step % len(batches)]
        out = model(x, mask, heads=(head,))
        logits = out.logits[head]
        if head == "lm":
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        else:
            loss = torch.nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cell", CELLS)
def test_the_language_model_loss_falls(cell):
    model = tiny(cell, input_dropout=0.1, output_dropout=0.1).train()
    period = torch.arange(24) % 6 + 3  # a repeating pattern a recurrent model can learn
    batches = [(period.repeat(4, 1), None, None)]
    losses = _train(model, batches, "lm")
    assert losses[0] > 3.0  # about ln(40): nothing learned yet
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("pooling", ["concat", "last", "max", "mean"])
def test_the_classification_loss_falls(pooling):
    model = tiny("lstm", heads=("classifier",), classifier_pooling=pooling).train()
    torch.manual_seed(3)
    x = torch.randint(3, VOCAB, (16, 8))
    y = (x == 5).any(dim=1).long()  # positive when word 5 occurs
    x[::3, 6:] = 0
    mask = (x != 0).long()
    losses = _train(model, [(x, y, mask)], "classifier", steps=80)
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


@pytest.fixture
def word_tokenizer() -> Tokenizer:
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, special_tokens={"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "<eos>"})


@pytest.mark.parametrize("heads", [("lm",), ("classifier",)])
def test_save_and_load_give_equal_outputs(heads, word_tokenizer, tmp_path):
    model = tiny("gru", heads=heads, seed=4).eval()
    tunelab.save_pretrained(model, word_tokenizer, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "tunelab-rnn" and config["heads"] == list(heads) and config["cell"] == "gru"
    again, tokenizer = tunelab.load(tmp_path / "m")
    assert again.config == model.config and tokenizer.get_vocab() == word_tokenizer.get_vocab()
    x = torch.tensor([word_tokenizer.encode("w3 w4 w9 w17 w5")])
    with torch.no_grad():
        a, b = model(x), again(x)
    for head in heads:
        assert torch.equal(a.logits[head], b.logits[head])
    if heads == ("lm",):  # the tied output layer is stored once, as the embeddings
        from safetensors.torch import load_file

        assert "heads.lm.proj.weight" not in load_file(str(tmp_path / "m" / "model.safetensors"))
        assert again.heads["lm"].proj.weight is again.backbone.tok_embeddings.weight


def test_a_broken_config_json_names_the_field(tmp_path, word_tokenizer):
    model = tiny().eval()
    tunelab.save_pretrained(model, word_tokenizer, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    good = json.loads(path.read_text())
    for change, message in [({"cell": "transformer"}, "cell must be one of rnn, lstm, gru"),
                            ({"hidden_sise": 3}, "unknown tunelab-rnn config field.*hidden_sise"),
                            ({"hidden_size": "12"}, "'hidden_size' must be an integer"),
                            ({"heads": ["lm", "decoder"]}, "'heads' must be a list of head names"),
                            ({"hidden_size": 13}, r"weight backbone\.layers\.0\.\w+ has shape \(48,\), the config implies \(52,\)")]:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(CheckpointError, match=message):
            tunelab.load(tmp_path / "m")


def test_architecture_fields_are_checked():
    config = config_from_architecture({"family": "rnn", "cell": "gru", "hidden_size": 16, "num_layers": 1},
                                      vocab_size=VOCAB)
    assert config.cell == "gru" and config.num_heads == 0  # no attention heads needed
    with pytest.raises(ValueError, match="model.architecture: cell must be one of"):
        config_from_architecture({"family": "rnn", "cell": "lsmt", "hidden_size": 16, "num_layers": 1},
                                 vocab_size=VOCAB)
    with pytest.raises(ValueError, match="model.architecture.hiden_size: .*did you mean 'hidden_size'"):
        config_from_architecture({"family": "rnn", "hiden_size": 16}, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="input_dropout must be in"):
        config_from_architecture({"family": "rnn", "hidden_size": 16, "num_layers": 1, "input_dropout": 1.0},
                                 vocab_size=VOCAB)


def test_state_and_cache_do_not_mix_families():
    model = tiny().eval()
    with pytest.raises(TypeError, match="no KV cache"):
        model.new_cache(1, 8)
    with pytest.raises(ValueError, match="not a KV cache"):
        model(ids(1, 4), document_ids=torch.zeros(1, 4, dtype=torch.long))


def test_state_survives_a_checkpoint_round_trip():
    model = tiny("lstm").eval()
    with torch.no_grad():
        state = model(ids(2, 5)).state
    again = state_from_tensors(state_to_tensors(state))
    assert all(torch.equal(a, b) for la, lb in zip(state, again) for a, b in zip(la, lb))
    assert state_from_tensors({}) is None and detach_state(None) is None


def test_generation_of_left_padded_prompts_equals_each_prompt_alone(word_tokenizer):
    from tunelab.generate import GenerationSettings, generate

    model = tiny("lstm", seed=5).eval()
    with torch.no_grad():  # larger weights: varied, not constant, greedy continuations
        for p in model.parameters():
            p.mul_(8.0)
    prompts = [word_tokenizer.encode(t) for t in ("w3 w4 w5 w6 w7", "w9", "w12 w30 w31")]
    settings = GenerationSettings(max_new_tokens=6, eos_token_ids=[])
    together = [c.token_ids for c in generate(model, word_tokenizer, prompts, settings)]
    alone = [generate(model, word_tokenizer, [p], settings)[0].token_ids for p in prompts]
    assert together == alone
    assert len({tuple(t) for t in together}) > 1


@pytest.mark.parametrize("cell", CELLS)
def test_weight_dropout_drops_recurrent_weights_in_training_only(cell):
    model = tiny(cell, weight_dropout=0.5)
    plain = tiny(cell)  # the same seed: the same weights
    x = ids(3, 7)
    layer = model.backbone.layers[0]
    before = layer.weight_hh_l0.detach().clone()
    model.train()
    out = model(x).logits["lm"]
    assert not torch.allclose(out, plain.eval()(x).logits["lm"])  # W_hh was dropped
    out.sum().backward()
    assert torch.equal(layer.weight_hh_l0.detach(), before)  # the layer's own weight is untouched
    grad = layer.weight_hh_l0.grad
    assert grad is not None and (grad == 0).any() and (grad != 0).any()  # dropped entries get no gradient
    torch.testing.assert_close(model.eval()(x).logits["lm"], plain(x).logits["lm"], rtol=0, atol=0)
    padded = torch.tensor([[4, 5, 6, 0], [7, 8, 9, 10]])
    model.train()(padded, attention_mask=(padded != 0).long())  # packed sequences run with the dropped weight too
