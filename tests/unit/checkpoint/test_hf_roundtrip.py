"""Reading and writing Hugging Face directories: lossless round trips, directories transformers loads,
every weight layout (single safetensors, sharded safetensors, pytorch_model.bin, sharded .bin) and dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tunelab.checkpoint.hf import read_hf_model, write_hf_model

CASES = [
    "bert-base", "bert-mlm", "bert-pretraining", "bert-cls", "bert-tagger", "bert-qa", "roberta-mlm", "roberta-cls",
    "distilbert-mlm", "distilbert-cls", "gpt2-lm", "gpt2-cls", "llama-gqa", "llama-tied", "llama-bias",
    "llama-rope-linear", "llama-rope-llama3", "qwen2", "mistral-window", "llama-cls",
]
TIED = {"bert-mlm", "bert-pretraining", "roberta-mlm", "distilbert-mlm", "gpt2-lm", "llama-tied"}


def assert_same_tensors(a, b) -> None:
    """Same names, dtypes and values (modules or state dicts)."""
    sa = a.state_dict() if isinstance(a, torch.nn.Module) else a
    sb = b.state_dict() if isinstance(b, torch.nn.Module) else b
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def tensor_outputs(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("case", CASES)
def test_write_then_read_is_lossless(make_hf_model, tmp_path, case):
    _, path = make_hf_model(case)
    model = read_hf_model(path)
    written = write_hf_model(model, tmp_path / "out")
    assert sorted(p.name for p in written.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    again = read_hf_model(written)
    assert again.config == model.config
    assert set(again.heads) == set(model.heads)
    assert_same_tensors(model, again)
    if case in TIED:
        head = again.heads["lm"].proj if "lm" in again.heads else again.heads["mlm"].decoder
        assert head.weight is again.backbone.tok_embeddings.weight
    # the written tensors are the HF checkpoint's own, under the same names (up to dropped buffers/duplicates)
    original, ours = load_file(path / "model.safetensors"), load_file(written / "model.safetensors")
    for name, tensor in ours.items():
        assert torch.equal(tensor, original[name]), name


@pytest.mark.parametrize("case", CASES)
def test_transformers_loads_written_directory(tiny, make_hf_model, tmp_path, case):
    import transformers as tf

    hf_model, path = make_hf_model(case)
    written = write_hf_model(read_hf_model(path), tmp_path / "out")
    config = json.loads((written / "config.json").read_text())
    assert config["architectures"] == [type(hf_model).__name__]
    cls = getattr(tf, config["architectures"][0])
    reloaded, info = cls.from_pretrained(written, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = tiny.padded_batch([tiny.SEQ, 6], tiny.SEQ, side="right", pad=tiny.pad_id(case), seed=7)
    with torch.no_grad():
        expected = tensor_outputs(hf_model(input_ids=ids, attention_mask=mask))
        actual = tensor_outputs(reloaded.eval()(input_ids=ids, attention_mask=mask))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert tiny.record("roundtrip transformers reload", tiny.max_diff(actual[key], expected[key])) <= 1e-5, key


SHARDED = ["bert-pretraining", "distilbert-cls", "gpt2-lm", "llama-gqa"]


@pytest.mark.parametrize("case", SHARDED)
def test_sharded_safetensors_read_like_single_file(tiny, make_hf_model, tmp_path, case):
    hf_model, path = make_hf_model(case)
    sharded = tiny.save_hf_model(hf_model, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) >= 2
    assert_same_tensors(read_hf_model(sharded), read_hf_model(path))


def _as_bin(src, dst, shards: int = 1):
    """The same checkpoint as pytorch_model.bin (or .bin shards with an index), as older transformers wrote."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    if shards == 1:
        torch.save(tensors, dst / "pytorch_model.bin")
        return dst
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: tensors[n] for n in names[i::shards]}
        torch.save(part, dst / shard)
        weight_map.update({n: shard for n in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("shards", [1, 3], ids=["single", "sharded"])
@pytest.mark.parametrize("case", ["bert-mlm", "gpt2-cls", "llama-gqa"])
def test_pytorch_bin_reads_like_safetensors(make_hf_model, tmp_path, case, shards):
    _, path = make_hf_model(case)
    bin_dir = _as_bin(path, tmp_path / "bin", shards)
    assert_same_tensors(read_hf_model(bin_dir), read_hf_model(path))


@pytest.mark.parametrize("case", ["bert-mlm", "gpt2-lm", "llama-gqa"])
def test_bf16_read_and_write(tiny, make_hf_model, tmp_path, case):
    _, path = make_hf_model(case)
    fp32 = read_hf_model(path)
    bf16 = read_hf_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for name, tensor in bf16.state_dict().items():
        assert torch.equal(tensor, fp32.state_dict()[name].to(torch.bfloat16)), name
    ids = tiny.random_ids(2, tiny.SEQ)
    head = next(iter(fp32.heads))
    with torch.no_grad():
        reference = fp32(ids).logits[head]
        low = bf16(ids).logits[head]
    assert low.dtype == torch.bfloat16
    assert tiny.max_diff(low, reference) <= 0.05 * float(reference.abs().max())

    # a bf16 model writes bf16 tensors and reads back unchanged
    written = write_hf_model(bf16, tmp_path / "bf16")
    assert json.loads((written / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(written / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert_same_tensors(read_hf_model(written, dtype=torch.bfloat16), bf16)
    # without a dtype the model is built in fp32 and the bf16 values are upcast exactly
    assert_same_tensors(read_hf_model(written), {k: v.float() for k, v in bf16.state_dict().items()})
    # and write_hf_model(dtype=...) converts an fp32 model on the way out
    converted = read_hf_model(write_hf_model(fp32, tmp_path / "converted", dtype=torch.bfloat16), dtype=torch.bfloat16)
    assert_same_tensors(converted, bf16)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}  # the model written is left as it was


def test_reading_a_checkpoint_runs_no_initialiser_and_does_not_import_dynamo(make_hf_model, tmp_path):
    """The skeleton is built on the meta device with torch.nn.init's initialisers skipped (drawing on meta
    imports torch._dynamo, 0.85 s); they are restored afterwards."""
    import subprocess
    import sys
    from pathlib import Path

    _, path = make_hf_model("llama-gqa")
    before = torch.nn.init.normal_
    read_hf_model(path)
    assert torch.nn.init.normal_ is before
    src = str(Path(__file__).resolve().parents[3] / "src")
    script = ("import sys, torch\nfrom tunelab.checkpoint.hf import read_hf_model\n"
              f"model = read_hf_model({str(path)!r})\n"
              "print('torch._dynamo' in sys.modules, float(model.backbone.rotary.inv_freq[1]))")
    out = subprocess.run([sys.executable, "-c", script], env={"PYTHONPATH": src, "PATH": ""},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"
    config = json.loads((path / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert float(out[1]) == pytest.approx(config.get("rope_theta", 10000.0) ** (-2 / head_dim), rel=1e-6)
