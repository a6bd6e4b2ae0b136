"""Training checkpoints: written to a temporary directory and renamed, so a kill never leaves a
half-written checkpoint under a real name; everything needed to resume exactly is inside."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import CheckpointError

STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    best_metrics: dict | None = None  # every metric of the best evaluation: metrics.json of a resumed run


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes (trainable parameters), each stored once even when tied."""
    out, seen = {}, set()
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            out[name] = param.detach().contiguous().cpu()
    return out


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model, optimizer, scheduler, state: TrainerState, *,
                    task_state: dict | None = None) -> Path:
    """Write checkpoint `directory` atomically (all files into DIR.tmp, then one rename).

    Without optimizer and scheduler it holds the weights only (the best model's copy). `task_state` is what
    a task step carries between batches (a recurrent LM's state), saved with the optimizer.
    """
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "model.safetensors"))
    if optimizer is not None:
        blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
        if task_state is not None:
            blob["task"] = task_state
        torch.save(blob, tmp / "training.pt")
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    _fsync_dir(tmp)
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory


def _fsync_dir(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def load_model_weights(directory: Path, model) -> None:
    """Put a checkpoint's trained tensors back into `model` (same method and heads)."""
    tensors = load_file(str(directory / "model.safetensors"))
    missing = set(trainable_state(model)) - set(tensors)
    if missing:
        raise CheckpointError(f"{directory}: checkpoint lacks trained weights {sorted(missing)[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in params:
                raise CheckpointError(f"{directory}: checkpoint has a weight the model lacks: {name}")
            params[name].copy_(tensor)


def load_checkpoint(directory: Path, model, optimizer, scheduler, task=None) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG states (and the task step's carried state, when the task
    has one); returns the trainer state to continue from."""
    load_model_weights(directory, model)
    blob = torch.load(directory / "training.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    if task is not None and hasattr(task, "load_state_dict"):
        if "task" not in blob:
            raise CheckpointError(f"{directory}: the checkpoint lacks the task's carried state (written by an "
                                  "older tunelab?); it cannot resume exactly")
        task.load_state_dict(blob["task"])
    return TrainerState(**json.loads((directory / STATE_FILE).read_text()))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (temporary and best copies excluded)."""
    found = []
    for path in run_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / STATE_FILE).exists() and (path / "training.pt").exists():
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
