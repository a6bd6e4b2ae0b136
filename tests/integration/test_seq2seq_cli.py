"""Translation and summarization end to end through the `tunelab` command, on tiny models and real data:
an encoder-decoder from scratch (shared and separate vocabularies), BERT2BERT, and a decoder-only model
fine-tuned on the same pairs as chat turns. Each run must lower its loss; `tunelab eval --json` must report
the metrics the run logged; `tunelab predict` must write the decoded targets, and sacreBLEU's own command on
those files must give the BLEU and chrF that eval reported."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rouge_score.rouge_scorer import RougeScorer
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

import tunelab
from tunelab.cli.main import main
from tunelab.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
MULTI30K = DATA / "multi30k_en_de"
DIALOGSUM = DATA / "dialogsum" / "dialogsum.dev.jsonl"
SACREBLEU = Path(sys.executable).parent / "sacrebleu"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bpe_dir(path: Path, files: list[Path], vocab_size: int, lines: int = 3000) -> Path:
    """A Metaspace BPE tokenizer (as examples/seq2seq_tokenizer.py makes) from the first lines of `files`."""
    text = [line for f in files for line in f.read_text(encoding="utf-8").splitlines()[:lines]]
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                          special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    Tokenizer(backend, special_tokens={"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                                       "unk_token": "<unk>"}).save(path)
    return path


@pytest.fixture(scope="module")
def shared_bpe(tmp_path_factory) -> Path:
    return bpe_dir(tmp_path_factory.mktemp("bpe"), [MULTI30K / "train.en", MULTI30K / "train.de"], 600)


@pytest.fixture(scope="module")
def val40(tmp_path_factory) -> tuple[Path, Path]:
    """The first 40 validation pairs as two files (in the test's temporary directory)."""
    path = tmp_path_factory.mktemp("val40")
    for side in ("en", "de"):
        lines = (MULTI30K / f"val.{side}").read_text(encoding="utf-8").splitlines()[:40]
        (path / f"val.{side}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path / "val.en", path / "val.de"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_run(capsys, tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    code, _, err = cli(capsys, "train", str(path), "--no-progress")
    assert code == 0, err
    return Path(config["output_dir"])


def history(run: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def eval_json(capsys, run: Path, *args: str) -> dict:
    code, out, err = cli(capsys, "eval", str(run), *args, "--json")
    assert code == 0, err
    return json.loads(out)


def sacrebleu_command(hypotheses: list[str], references: Path, tmp_path: Path) -> dict[str, float]:
    (tmp_path / "hyp.txt").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
    result = subprocess.run([str(SACREBLEU), str(references), "-i", str(tmp_path / "hyp.txt"), "-m", "bleu", "chrf",
                             "-w", "6"], capture_output=True, text=True, check=True)
    return {entry["name"]: entry["score"] for entry in json.loads(result.stdout)}


def translation_config(tmp_path: Path, tokenizer: Path, val: tuple[Path, Path], **model) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"architecture": {"family": "seq2seq", "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                                   "intermediate_size": 64, "dropout": 0.0, "norm_first": True,
                                   "max_position_embeddings": 64}, "tokenizer": str(tokenizer), **model},
        "task": {"type": "seq2seq", "label_smoothing": 0.1, "metrics": ["bleu", "chrf"],
                 "generation": {"beam_size": 2, "length_penalty": 0.6, "max_new_tokens": 24}},
        "data": {"format": "parallel", "train": [str(MULTI30K / "train.en"), str(MULTI30K / "train.de")],
                 "validation": [str(val[0]), str(val[1])], "max_length": 48, "max_train_examples": 512},
        "train": {"max_steps": 60, "batch_size": 32, "lr": 3e-3, "warmup": 5, "precision": "fp32",
                  "logging_steps": 10, "eval_at_start": True, "save_steps": 0, "weight_decay": 0.0},
    }


@pytest.mark.skipif(not SACREBLEU.exists(), reason="the sacrebleu command is not installed beside this Python")
def test_translation_from_scratch_train_eval_predict_generate(shared_bpe, val40, tmp_path, capsys):
    run = train_run(capsys, tmp_path, translation_config(tmp_path, shared_bpe, val40))
    before, after = history(run, "validation")[0], json.loads((run / "metrics.json").read_text())
    assert before["step"] == 0 and after["loss"] < before["loss"] - 1.5, (before["loss"], after["loss"])
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]), rel=1e-6)
    assert {"bleu", "chrf", "loss", "perplexity"} <= set(after) and after["chrf"] > before["chrf"]
    train_losses = [r["loss"] for r in history(run, "train")]
    assert train_losses[-1] < train_losses[0] - 1.0, train_losses
    assert json.loads((run / "model" / "config.json").read_text())["model_type"] == "tunelab-seq2seq"

    metrics = eval_json(capsys, run)
    for key in ("loss", "perplexity", "bleu", "chrf"):
        assert metrics[key] == pytest.approx(after[key], abs=1e-6), key

    out = tmp_path / "predictions.jsonl"
    code, stdout, err = cli(capsys, "predict", str(run), "--data", str(val40[0]), "--data", str(val40[1]),
                            "--out", str(out))
    assert code == 0, err and "wrote 40 predictions" in stdout
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    sources = val40[0].read_text(encoding="utf-8").splitlines()
    assert [r["source"] for r in rows] == sources and all(r["prediction"] for r in rows)
    scores = sacrebleu_command([r["prediction"] for r in rows], val40[1], tmp_path)
    assert metrics["bleu"] == pytest.approx(scores["BLEU"], abs=1e-6)
    assert metrics["chrf"] == pytest.approx(scores["chrF2"], abs=1e-6) and scores["chrF2"] > 5

    # the same translations from `tunelab generate` (the run's beam settings) and from the Python API
    code, stdout, err = cli(capsys, "generate", "--model", str(run), "--prompt", sources[3])
    assert code == 0, err
    assert stdout.strip() == rows[3]["prediction"]
    from tunelab.generate import BeamSettings, seq2seq_generate

    model, tokenizer = tunelab.load(run / "model")
    assert seq2seq_generate(model, tokenizer, sources[:5], BeamSettings(beam_size=2, max_new_tokens=24)) == \
        [r["prediction"] for r in rows[:5]]
    # a bare model directory is evaluated as seq2seq, with the metrics asked for
    bare = eval_json(capsys, run / "model", "--data", str(val40[0]), "--data", str(val40[1]),
                     "task.metrics=[bleu]", "task.generation.beam_size=2", "task.generation.max_new_tokens=24",
                     "data.format=parallel", "train.precision=fp32")
    assert bare["bleu"] == pytest.approx(metrics["bleu"], abs=1e-6)


def test_separate_vocabularies(shared_bpe, val40, tmp_path, capsys):
    source = bpe_dir(tmp_path / "en", [MULTI30K / "train.en"], 400)
    target = bpe_dir(tmp_path / "de", [MULTI30K / "train.de"], 500)
    config = translation_config(tmp_path, source, val40, target_tokenizer=str(target))
    config["train"].update(max_steps=30, eval_at_start=False)
    run = train_run(capsys, tmp_path, config)
    model, tokenizer = tunelab.load(run / "model")
    from tunelab.tokenizer.pair import TokenizerPair

    assert isinstance(tokenizer, TokenizerPair) and (run / "model" / "target_tokenizer" / "tokenizer.json").exists()
    assert model.config.vocab_size == 400 and model.config.target_vocab_size == 500
    assert model.backbone.source_embeddings.weight.shape[0] == 400 and model.heads["lm"].proj.weight.shape[0] == 500
    losses = [r["loss"] for r in history(run, "train")]
    assert losses[-1] < losses[0] - 0.5, losses  # label-smoothed training loss, 30 steps
    metrics = eval_json(capsys, run)
    assert metrics["loss"] == pytest.approx(json.loads((run / "metrics.json").read_text())["loss"], abs=1e-6)


def test_summarization_with_rouge_on_dialogsum_fields(shared_bpe, tmp_path, capsys):
    tokenizer = bpe_dir(tmp_path / "bpe", [DIALOGSUM], 500, lines=400)
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"architecture": {"family": "seq2seq", "hidden_size": 32, "num_layers": 1, "num_heads": 4,
                                   "dropout": 0.0, "max_position_embeddings": 512}, "tokenizer": str(tokenizer)},
        "task": {"type": "seq2seq", "metrics": ["rouge"], "generation": {"beam_size": 2, "max_new_tokens": 20}},
        "data": {"train": str(DIALOGSUM), "source_field": "dialogue", "target_field": "summary", "max_length": 256,
                 "max_target_length": 48, "validation_split": 0.1, "max_train_examples": 96,
                 "max_validation_examples": 12},
        "train": {"max_steps": 24, "batch_size": 8, "lr": 3e-3, "precision": "fp32", "logging_steps": 6,
                  "save_steps": 0},
    }
    run = train_run(capsys, tmp_path, config)
    final = json.loads((run / "metrics.json").read_text())
    assert all(0.0 <= final[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL")) and final["rouge1"] > 0
    losses = [r["loss"] for r in history(run, "train")]
    assert losses[-1] < losses[0] - 0.5, losses
    out = tmp_path / "summaries.jsonl"
    code, _, err = cli(capsys, "predict", str(run), "--data", str(DIALOGSUM), "--out", str(out),
                       "data.max_train_examples=5")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 500 and set(rows[0]) == {"source", "prediction", "target"}
    # eval's ROUGE-L on the first 12 records equals rouge-score's on predict's output for them
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    first = [scorer.score(r["target"], r["prediction"])["rougeL"].fmeasure for r in rows[:12]]
    (tmp_path / "first12.jsonl").write_text("".join(line + "\n" for line in DIALOGSUM.read_text().splitlines()[:12]))
    metrics = eval_json(capsys, run, "--data", str(tmp_path / "first12.jsonl"))
    assert metrics["rougeL"] == pytest.approx(sum(first) / 12, abs=1e-9)


def test_bert2bert_warm_start_trains_and_reloads(tmp_path, capsys, val40, tiny_bert):
    bert = tiny_bert
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"source": str(bert), "warm_start": "bert2bert"},
        "task": {"type": "seq2seq", "metrics": ["bleu"], "generation": {"beam_size": 1, "max_new_tokens": 16}},
        "data": {"format": "parallel", "train": [str(MULTI30K / "train.en"), str(MULTI30K / "train.de")],
                 "validation": [str(val40[0]), str(val40[1])], "max_length": 48, "max_train_examples": 256,
                 "max_validation_examples": 16},
        "train": {"max_steps": 24, "batch_size": 16, "lr": 3e-3, "precision": "fp32", "logging_steps": 6,
                  "save_steps": 0},
    }
    run = train_run(capsys, tmp_path, config)
    losses = [r["loss"] for r in history(run, "train")]
    assert losses[-1] < losses[0] - 1.0, losses
    model, tokenizer = tunelab.load(run / "model")
    assert model.is_encoder_decoder and model.config.embeddings == "bert"
    assert model.config.start_token_id == tokenizer.cls_token_id and model.config.eos_token_id == tokenizer.sep_token_id
    assert "bleu" in eval_json(capsys, run)


@pytest.fixture(scope="module")
def chatml_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer that has ChatML's tokens and template."""
    import transformers as tf

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = [line for side in ("en", "de") for line in (MULTI30K / f"train.{side}").read_text().splitlines()[:3000]]
    backend.train_from_iterator(lines, trainer)
    path = tmp_path_factory.mktemp("chat-llama")
    torch.manual_seed(0)
    end = backend.token_to_id("<|im_end|>")
    tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=end,
        bos_token_id=end, pad_token_id=backend.token_to_id("<|endoftext|>"))).save_pretrained(path)
    Tokenizer(backend, special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
              chat_template=CHATML).save(path)
    return path


def test_decoder_only_translation_as_chat_sft(chatml_llama_dir, val40, tmp_path, capsys):
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"source": str(chatml_llama_dir)},
        "task": {"type": "chat", "metrics": ["bleu", "chrf"], "generation": {"beam_size": 2, "max_new_tokens": 12}},
        "data": {"format": "parallel", "instruction": "Translate English to German:",
                 "train": [str(MULTI30K / "train.en"), str(MULTI30K / "train.de")],
                 "validation": [str(val40[0]), str(val40[1])], "max_length": 96, "max_train_examples": 128,
                 "max_validation_examples": 10},
        "train": {"max_steps": 24, "batch_size": 8, "lr": 3e-3, "precision": "fp32", "logging_steps": 6,
                  "save_steps": 0, "eval_at_start": True},
    }
    run = train_run(capsys, tmp_path, config)
    before, final = history(run, "validation")[0], json.loads((run / "metrics.json").read_text())
    assert final["loss"] < before["loss"] - 1.0 and {"bleu", "chrf", "perplexity"} <= set(final)
    assert final["chrf"] > before["chrf"]
    out = tmp_path / "translations.jsonl"
    code, _, err = cli(capsys, "predict", str(run), "--data", str(val40[0]), "--out", str(out))
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and "target" not in rows[0]
    scores = sacrebleu_command([r["prediction"] for r in rows[:10]], _first_lines(val40[1], 10, tmp_path), tmp_path)
    assert final["chrf"] == pytest.approx(scores["chrF2"], abs=1e-6)


def _first_lines(path: Path, n: int, tmp_path: Path) -> Path:
    out = tmp_path / f"first{n}-{path.name}"
    out.write_text("\n".join(path.read_text(encoding="utf-8").splitlines()[:n]) + "\n", encoding="utf-8")
    return out


@pytest.mark.parametrize("change, message", [
    ({"model": {"architecture": {"family": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 4}}},
     "task seq2seq needs an encoder-decoder"),
    ({"data": {"train": ["a.en", "b.de", "c.fr"]}}, "data.train: format parallel reads two line-aligned files"),
    ({"task": {"type": "seq2seq", "metrics": ["blue"]}}, "task.metrics.0: Input should be 'bleu', 'chrf' or 'rouge'"),
    ({"task": {"type": "seq2seq", "generation": {"beams": 4}}},
     "task.generation.beams: unknown key; did you mean 'task.generation.beam_size'?"),
    ({"data": {"instruction": "Translate:"}}, "data.instruction turns source/target pairs into chat turns"),
])
def test_config_errors(shared_bpe, val40, tmp_path, capsys, change, message):
    config = translation_config(tmp_path, shared_bpe, val40)
    for section, values in change.items():
        config[section] = {**config[section], **values}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = cli(capsys, "train", str(path))
    assert code == 1 and message in err, err


def test_unequal_parallel_files_fail_with_both_names(shared_bpe, val40, tmp_path, capsys):
    short = _first_lines(val40[1], 39, tmp_path)
    config = translation_config(tmp_path, shared_bpe, val40)
    config["data"]["validation"] = [str(val40[0]), str(short)]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = cli(capsys, "train", str(path))
    assert code == 1
    assert f"{val40[0]} has 40 lines but {short} has 39" in err and f"{val40[0]}:40 has no partner" in err
