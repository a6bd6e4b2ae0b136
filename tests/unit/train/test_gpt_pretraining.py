"""GPT pretraining: a character tokenizer trained by the run, a model from scratch whose loss falls, text samples at
each evaluation, `tunelab eval` of the run directory, continued pretraining from a run or an HF directory, and
plain causal attention for rows that hold one document."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tunelab.cli.main import main
from tunelab.config.loading import validate
from tunelab.config.schema import TrainConfig
from tunelab.errors import ConfigError
from tunelab.models.base import decoder_attention_mask
from tunelab.tokenizer import Tokenizer
from tunelab.train.run import train

SHAKESPEARE = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinyshakespeare" / "input.txt"
SST2_DEV = SHAKESPEARE.parents[1] / "sst2" / "dev.tsv"

TINY_GPT = {"family": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 64,
            "dropout": 0.0, "attention_dropout": 0.0}


def gpt_config(output_dir: Path, *, model: dict | None = None, data: dict | None = None, **train) -> TrainConfig:
    return validate(TrainConfig, {
        "output_dir": str(output_dir),
        "model": model or {"architecture": TINY_GPT, "train_tokenizer": {"type": "char"}},
        "task": {"type": "causal_lm"},
        "data": {"train": str(SHAKESPEARE), "max_length": 64, "validation_split": 0.1, "max_train_examples": 512,
                 "max_validation_examples": 24, **(data or {})},
        "train": {"max_steps": 60, "batch_size": 16, "lr": 3e-3, "warmup": 0, "save_steps": 0, "eval_steps": 30,
                  "eval_at_start": True, "logging_steps": 10, "precision": "fp32", "sample_prompts": ["ROMEO:"],
                  "sample_max_new_tokens": 40, **train},
    }, "test")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory) -> Path:
    """A char-level GPT trained from scratch for 60 steps, its tokenizer trained by the run."""
    run = tmp_path_factory.mktemp("scratch") / "run"
    train(gpt_config(run), show_progress=False, log=lambda *_: None)
    return run


def test_the_run_trains_its_char_tokenizer_and_saves_it_with_the_model(scratch_run):
    trained = Tokenizer.from_dir(scratch_run / "tokenizer")
    saved = Tokenizer.from_dir(scratch_run / "model")
    assert trained.vocab_size == saved.vocab_size == 67  # 65 characters + <|endoftext|> + <unk>
    assert trained.get_vocab() == saved.get_vocab()
    text = SHAKESPEARE.read_text(encoding="utf-8")[-500:]
    assert saved.decode(saved.encode(text)) == text
    model_config = json.loads((scratch_run / "model" / "config.json").read_text())
    assert model_config["vocab_size"] == 67 and model_config["eos_token_id"] == saved.eos_token_id == 0


def test_the_validation_loss_falls_from_a_uniform_guess(scratch_run):
    validation = [r for r in records(scratch_run / "metrics.jsonl") if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [0, 30, 60]
    assert validation[0]["loss"] == pytest.approx(math.log(67), abs=0.15)  # untrained: ~ uniform over 67 ids
    assert validation[1]["loss"] < validation[0]["loss"] - 0.9
    assert validation[2]["loss"] < validation[1]["loss"]
    final = json.loads((scratch_run / "metrics.json").read_text())
    assert final["loss"] == pytest.approx(validation[2]["loss"])
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"]), rel=1e-6)
    train_losses = [r["loss"] for r in records(scratch_run / "metrics.jsonl") if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0] - 0.7  # the mean of steps 1-10 against that of steps 51-60


def test_samples_are_written_at_every_evaluation_and_into_the_report(scratch_run):
    samples = records(scratch_run / "samples.jsonl")
    assert [s["step"] for s in samples] == [0, 30, 60]
    assert all(s["prompt"] == "ROMEO:" for s in samples)
    assert all(0 < len(s["text"]) <= 40 for s in samples)  # one character per token, at most 40 tokens
    assert len({s["text"] for s in samples}) == 3  # the model changed between evaluations
    report = (scratch_run / "report.md").read_text(encoding="utf-8")
    assert "## Samples at step 60" in report and "ROMEO:" + samples[-1]["text"] in report

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(scratch_run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "samples/0/text_summary" in events.Tags()["tensors"]
    texts = events.Tensors("samples/0/text_summary")
    assert [t.step for t in texts] == [0, 30, 60]
    assert samples[-1]["text"] in texts[-1].tensor_proto.string_val[0].decode()


def test_sampling_leaves_the_random_state_of_training_alone(tmp_path):
    """With dropout, a sampler that drew from the global generator would change every later dropout mask."""
    model = {"architecture": {**TINY_GPT, "dropout": 0.1}, "train_tokenizer": {"type": "char"}}
    finals = [train(gpt_config(tmp_path / name, model=model, max_steps=30, eval_steps=10, sample_prompts=prompts),
                    show_progress=False, log=lambda *_: None)["loss"]
              for name, prompts in (("with", ["ROMEO:", "JULIET:"]), ("without", []))]
    assert finals[0] == pytest.approx(finals[1], abs=1e-6)  # float noise of memory layout only
    assert len(records(tmp_path / "with" / "samples.jsonl")) == 2 * 4 and not (tmp_path / "without" / "samples.jsonl").exists()


def test_samples_repeat_with_the_seed(scratch_run, tmp_path):

    import tunelab
    from tunelab.train.samples import TextSamples

    model, tokenizer = tunelab.load(scratch_run / "model")
    again = TextSamples(model, tokenizer, ["ROMEO:"], tmp_path, max_new_tokens=40, temperature=0.8, seed=42,
                        echo=lambda *_: None, tensorboard=False)(60)
    assert again[0]["text"] == records(scratch_run / "samples.jsonl")[-1]["text"]


def test_eval_json_of_a_from_scratch_run_reports_loss_and_perplexity(scratch_run, capsys):
    assert main(["eval", str(scratch_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    final = json.loads((scratch_run / "metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(final["loss"], abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)
    assert metrics["tokens"] == final["tokens"] == 24 * 63


def test_continued_pretraining_from_a_run_directory_starts_where_the_run_ended(scratch_run, tmp_path):
    run = tmp_path / "continued"
    final = train(gpt_config(run, model={"source": str(scratch_run)}, max_steps=30, eval_steps=0, lr=1e-3,
                             sample_prompts=[]), show_progress=False, log=lambda *_: None)
    start = [r for r in records(run / "metrics.jsonl") if r["split"] == "validation"][0]
    before = json.loads((scratch_run / "metrics.json").read_text())
    assert start["step"] == 0 and start["loss"] == pytest.approx(before["loss"], abs=1e-5)  # same weights, same data
    assert final["loss"] < before["loss"] - 0.05
    assert Tokenizer.from_dir(run / "model").get_vocab() == Tokenizer.from_dir(scratch_run / "model").get_vocab()


def test_continued_pretraining_from_an_hf_directory(train_llama_dir, tmp_path):
    config = gpt_config(tmp_path / "run", model={"source": str(train_llama_dir)}, max_steps=30, eval_steps=0,
                        sample_prompts=["KING"], sample_max_new_tokens=10)
    final = train(config, show_progress=False, log=lambda *_: None)
    start = [r for r in records(tmp_path / "run" / "metrics.jsonl") if r["split"] == "validation"][0]
    assert final["loss"] < start["loss"] - 0.3
    assert [s["prompt"] for s in records(tmp_path / "run" / "samples.jsonl")] == ["KING", "KING"]
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["model_type"] == "llama"


def test_rows_of_one_document_take_plain_causal_attention_with_equal_logits():
    ids = torch.randint(0, 50, (2, 12))
    one_document = torch.zeros(2, 12, dtype=torch.long)
    assert decoder_attention_mask(None, 12, 0, document_ids=one_document) == (None, True)
    two_documents = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    mask, is_causal = decoder_attention_mask(None, 12, 0, document_ids=two_documents)
    assert mask is not None and not is_causal and not bool(mask[0, 0, 6, 2])  # document 1 does not see document 0

    from tunelab.models.registry import build_model, config_from_architecture

    torch.manual_seed(0)
    model = build_model(config_from_architecture({**TINY_GPT, "vocab_size": 50}), heads=["lm"]).eval()
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        plain = model(ids, heads=("lm",)).logits["lm"]
        packed = model(ids, position_ids=positions, document_ids=one_document, heads=("lm",)).logits["lm"]
    assert torch.allclose(plain, packed, atol=1e-6)


def test_config_errors(tmp_path):
    raw = gpt_config(tmp_path / "run").model_dump(mode="json")

    def error(change) -> str:
        bad = json.loads(json.dumps(raw))
        change(bad)
        with pytest.raises(ConfigError) as info:
            validate(TrainConfig, bad, "gpt.yaml")
        return str(info.value)

    assert "did you mean 'model.train_tokenizer.vocab_size'" in error(
        lambda c: c["model"]["train_tokenizer"].update(vocab_sise=100))
    assert "model.train_tokenizer.type" in error(lambda c: c["model"]["train_tokenizer"].update(type="unigram"))
    assert "at most one of model.tokenizer" in error(lambda c: c["model"].update(tokenizer="minilm-l6"))
    assert "only a model built from scratch" in error(
        lambda c: c["model"].update(source="minilm-l6", architecture=None))
    assert "train.sample_prompts: Value error, prompt 0 is empty" in error(lambda c: c["train"].update(sample_prompts=[""]))
    assert "samples are generated text, for causal_lm and chat tasks, not classification" in error(
        lambda c: (c["task"].update(type="classification"), c["data"].update(train=str(SST2_DEV))))


def test_a_vocabulary_too_small_for_the_data_stops_the_run_before_training(tmp_path):
    config = gpt_config(tmp_path / "run", model={"architecture": TINY_GPT,
                                                 "train_tokenizer": {"type": "char", "vocab_size": 30}})
    with pytest.raises(ConfigError, match="vocabulary size 30 is too small .* need 67 ids"):
        train(config, show_progress=False, log=lambda *_: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------ shifting windows


def test_shifting_windows_at_epoch_0_are_the_packed_rows_and_later_epochs_other_cuts_of_the_same_text():
    import random

    from tunelab.data.text import ShiftingWindows, pack_documents

    rng = random.Random(0)
    documents = [[rng.randrange(2, 50) for _ in range(rng.randrange(1, 40))] + [1] for _ in range(60)]
    stream = [t for d in documents for t in d]
    windows = ShiftingWindows(documents, 16, seed=3)
    full_rows = [r for r in pack_documents(documents, 16) if r["length"] == 16]
    assert len(windows) == (len(stream) - 15) // 16 and len(full_rows) - len(windows) <= 1
    assert [windows[i] for i in range(len(windows))] == full_rows[:len(windows)]

    offsets = set()
    for epoch in range(1, 8):
        windows.set_epoch(epoch)
        offsets.add(windows.offset)
        for i in (0, len(windows) // 2, len(windows) - 1):
            row = windows[i]
            start = windows.offset + 16 * i
            assert row["input_ids"] == stream[start:start + 16]
            # a document starting inside the row: document id + 1, position 0, no target
            for t in range(1, 16):
                new_document = row["document_ids"][t] != row["document_ids"][t - 1]
                assert new_document == (row["position_ids"][t] == 0) == (row["labels"][t] == -100)
                assert new_document == (row["input_ids"][t - 1] == 1)  # the previous token ended a document (EOS)
    assert len(offsets) >= 5 and 0 not in offsets or len(offsets) >= 6
    windows.set_epoch(4)
    again = ShiftingWindows(documents, 16, seed=3)
    again.set_epoch(4)
    assert again.offset == windows.offset and again[5] == windows[5]


def test_random_offsets_train_and_resume_exactly(tmp_path):
    """Two steps an epoch, twelve steps: six cuts of the text; a run resumed at step 6 ends with the same weights."""
    from safetensors.torch import load_file

    def config(name, random_offsets=True):
        return gpt_config(tmp_path / name, data={"random_offsets": random_offsets, "max_train_examples": 32}, max_steps=12,
                          eval_steps=0, save_steps=6, eval_at_start=False, sample_prompts=[],
                          model={"architecture": {**TINY_GPT, "dropout": 0.1}, "train_tokenizer": {"type": "char"}})

    whole = train(config("whole"), show_progress=False, log=lambda *_: None)
    fixed = train(config("fixed", random_offsets=False), show_progress=False, log=lambda *_: None)
    assert abs(fixed["loss"] - whole["loss"]) > 1e-4  # other windows after the first epoch: other updates
    assert [r["epoch"] for r in records(tmp_path / "whole" / "metrics.jsonl") if r["split"] == "train"][-1] == 6.0

    # the same run stopped after its checkpoint at step 6 (a copy of the directory without what came later)
    import shutil

    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "model")
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint-*")] == ["checkpoint-6"]
    resumed = train(config("resumed"), resume=True, show_progress=False, log=lambda *_: None)
    assert resumed["loss"] == whole["loss"]
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
