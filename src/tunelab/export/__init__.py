"""Exporting models for deployment: a merged Hugging Face directory, a PEFT adapter, a GGUF file.

    from tunelab.export import export_model
    export_model("runs/chat-lora", "gguf", "chat.gguf", quant="q8_0")

`export_model` takes anything `tunelab.train.run.load_any` loads (a run directory, an HF directory, a GGUF
file, a registered name); `export_hf`, `export_peft` and `export_gguf` take a model and tokenizer in memory.
Nothing that already exists is overwritten, and every file is written under a temporary name first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import CheckpointError
from tunelab.export.adapter import export_peft
from tunelab.export.files import check_new_output
from tunelab.export.gguf import GGUF_QUANTS, export_gguf
from tunelab.export.hf import export_hf, merge_adapters

FORMATS = ("hf", "peft", "gguf")
QUANTS = ("f32", "f16", "bf16", "q8_0")
_HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: where, in which format and quantization, how many bytes, how long it took."""

    path: Path
    format: str
    quant: str | None
    model_type: str
    parameters: int
    bytes: int
    seconds: float


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_options(format: str, quant: str | None) -> None:
    """CheckpointError for an unknown format or a quantization the format cannot take."""
    if format not in FORMATS:
        raise CheckpointError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if quant is not None and quant not in QUANTS:
        raise CheckpointError(f"unknown quantization {quant!r}; use one of {', '.join(QUANTS)}")
    if format == "hf" and quant == "q8_0":
        raise CheckpointError("--quant q8_0 is for gguf; an hf directory holds f32, f16 or bf16 weights")
    if format == "peft" and quant is not None:
        raise CheckpointError("--quant does not apply to a peft adapter (its tensors keep the model's dtype)")


def export_model(source: str | Path, format: str, out: str | Path, *, quant: str | None = None) -> ExportResult:
    """Load `source` and write it as `format` ("hf", "peft" or "gguf") to the new path `out`.

    quant: hf: "f32", "f16" or "bf16" weights (default: as loaded); gguf: "f32", "f16" (default), "bf16" or
    "q8_0". CheckpointError (one line, naming why) when `out` exists and is not empty, or the model cannot
    take the format (peft without adapters; gguf for a family llama.cpp has no architecture for).
    """
    from tunelab.train.run import is_run_dir, load_any, resume_config

    check_options(format, quant)
    out = check_new_output(out)
    start = time.perf_counter()
    model, tokenizer = load_any(str(source))
    name = str(source)
    if format == "hf":
        export_hf(model, tokenizer, out, dtype=_HF_DTYPES.get(quant) if quant else None)
    elif format == "peft":
        base = resume_config(source).model.source if is_run_dir(str(source)) else ""
        export_peft(model, tokenizer, out, base_model=str(base), source=name)
    else:
        quant = quant or "f16"
        export_gguf(model, tokenizer, out, quant=quant, name=Path(name.rstrip("/")).name, source=name)
    return ExportResult(path=out, format=format, quant=quant, model_type=model.config.model_type,
                        parameters=model.num_parameters(), bytes=_size(out), seconds=time.perf_counter() - start)


__all__ = ["ExportResult", "FORMATS", "GGUF_QUANTS", "QUANTS", "check_options", "export_gguf", "export_hf",
           "export_model", "export_peft", "merge_adapters"]
