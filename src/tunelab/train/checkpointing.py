"""Training checkpoints: written to a temporary directory and renamed, so a kill never leaves a
half-written checkpoint under a real name; everything needed to resume exactly is inside.

A checkpoint does not depend on how many processes wrote it: the weights and the optimizer state are full
(unsharded) tensors, the optimizer state keyed by parameter name (torch.distributed.checkpoint's
get_optimizer_state_dict), so a run saved by N processes (DDP or FSDP2) resumes in one, and the other way.
Under torchrun every process calls save_checkpoint (FSDP2 gathers the shards collectively) and rank 0 writes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

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


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def _sharded(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes (trainable parameters), each stored once even when tied; of an FSDP2 model
    the full tensors gathered from every process (a collective: every rank calls it; ranks other than 0 get
    an empty dict)."""
    names, seen = [], set()
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            names.append(name)
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_full_options())
        return {name: full[name].contiguous() for name in names if name in full}
    params = dict(model.named_parameters())
    return {name: params[name].detach().contiguous().cpu() for name in names}


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's full state keyed by parameter name (the same for any number of processes)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Put back optimizer_state's dict (or an older checkpoint's optimizer.state_dict(), keyed by index)."""
    if any(isinstance(key, int) for key in state.get("state", {})) or any(
            isinstance(p, int) for group in state.get("param_groups", []) for p in group["params"]):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


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
    a task step carries between batches (a recurrent LM's state, of every stream: under torchrun the Trainer
    gathers each process's streams), saved with the optimizer. Under torchrun every process calls it and
    rank 0 writes (the others return before writing).
    """
    weights = trainable_state(model)
    optimizer_blob = optimizer_state(model, optimizer) if optimizer is not None else None
    if not _is_main():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"))
    if optimizer is not None:
        blob = {"optimizer": optimizer_blob, "scheduler": scheduler.state_dict(), "rng": rng_state()}
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
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    missing = trained - set(tensors)
    if missing:
        raise CheckpointError(f"{directory}: checkpoint lacks trained weights {sorted(missing)[:5]}")
    params = dict(model.named_parameters())
    if _sharded(model):  # every process reads the full tensors and keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise CheckpointError(f"{directory}: checkpoint has a weight the model lacks: {unknown[0]}")
        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in params:
                raise CheckpointError(f"{directory}: checkpoint has a weight the model lacks: {name}")
            params[name].copy_(tensor)


def load_checkpoint(directory: Path, model, optimizer, scheduler, task=None, *,
                    task_share: Callable[[dict], dict] | None = None) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG states (and the task step's carried state, when the task
    has one: `task_share` of it, this process's share under torchrun); returns the trainer state to continue
    from."""
    load_model_weights(directory, model)
    blob = torch.load(directory / "training.pt", map_location="cpu", weights_only=False)
    load_optimizer_state(model, optimizer, blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    if task is not None and hasattr(task, "load_state_dict"):
        if "task" not in blob:
            raise CheckpointError(f"{directory}: the checkpoint lacks the task's carried state (written by an "
                                  "older tunelab?); it cannot resume exactly")
        task.load_state_dict(task_share(blob["task"]) if task_share else blob["task"])
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
