"""tunelab export end to end: a LoRA run exported as hf, peft and gguf; the errors as one line."""

from __future__ import annotations

import torch
import yaml

import tunelab
from tunelab.cli.main import main

def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_a_lora_run_as_hf_peft_and_gguf(tiny_llama_dir, tmp_path, capsys):
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"source": str(tiny_llama_dir)},
        "task": {"type": "causal_lm"},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"train": str(tmp_path / "text.txt"), "max_length": 32, "max_train_examples": 16},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "precision": "fp32"},
    }
    (tmp_path / "text.txt").write_text("\n".join(f"To be or not to be, line {i}." for i in range(24)))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    code, _, err = cli(capsys, "train", str(tmp_path / "config.yaml"), "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    from tunelab.train.run import load_any

    model, tokenizer = load_any(str(run))
    ids = torch.tensor([tokenizer.encode("To be or not")])
    with torch.no_grad():
        expected = model(ids).logits["lm"]

    code, out, err = cli(capsys, "export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'hf'} (hf, llama,")
    code, out, err = cli(capsys, "export", str(run), "--format", "peft", "--out", str(tmp_path / "peft"))
    assert code == 0 and (tmp_path / "peft" / "adapter_config.json").exists(), err
    code, out, err = cli(capsys, "export", str(run), "--format", "gguf", "--quant", "f32",
                         "--out", str(tmp_path / "model.gguf"))
    assert code == 0 and "(gguf f32, llama," in out, err
    for path in (tmp_path / "hf", tmp_path / "model.gguf"):
        loaded, _ = tunelab.load(path)
        with torch.no_grad():
            assert (loaded(ids).logits["lm"] - expected).abs().max().item() <= 1e-5

    # errors: one line each, nothing overwritten
    code, _, err = cli(capsys, "export", str(run), "--format", "gguf", "--out", str(tmp_path / "model.gguf"))
    assert code == 1 and err.count("\n") == 1 and "output file exists" in err
    code, _, err = cli(capsys, "export", str(tiny_llama_dir), "--format", "peft", "--out", str(tmp_path / "p2"))
    assert code == 1 and err.count("\n") == 1 and "no LoRA/DoRA adapters" in err
    assert not (tmp_path / "p2").exists()
