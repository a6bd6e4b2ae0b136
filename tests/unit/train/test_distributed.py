"""train/distributed.py in one process: shares of a global batch and of a carried state, the mode torchrun
implies, config errors; and checkpoints whose optimizer state is keyed by parameter name (any world size
resumes them), with the older index-keyed form still read. The 2-process runs are in
tests/integration/test_distributed_cli.py."""

from __future__ import annotations

import pytest
import torch

from tunelab.config.schema import TrainSection
from tunelab.errors import ConfigError
from tunelab.train.checkpointing import TrainerState, load_checkpoint, save_checkpoint
from tunelab.train.distributed import (
    DistributedContext,
    check_distributed_config,
    full_parameters,
    resolve_mode,
    share_of_batch,
    share_of_rows,
    wrap_model,
)
from tunelab.train.optim import build_optimizer, build_scheduler


def context(rank: int, world_size: int) -> DistributedContext:
    return DistributedContext("ddp", rank, rank, world_size, torch.device("cpu"))


@pytest.mark.parametrize("size", [8, 5, 1, 0])
def test_the_shares_of_a_batch_are_its_rows_in_order(size):
    batch = list(range(100, 100 + size))
    shares = [share_of_batch(batch, context(rank, 4)) for rank in range(4)]
    assert [i for share in shares for i in share] == batch
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert share_of_batch(batch, DistributedContext()) == batch


@pytest.mark.parametrize("streams", [8, 5])
def test_each_process_keeps_the_rows_of_its_streams_of_a_carried_state(streams):
    """A recurrent LM's state [1, B, H] per layer: each process takes the rows of its share of the batch."""
    state = {"state": {"layer.0.0": torch.randn(1, streams, 3), "layer.0.1": torch.randn(1, streams, 3)}, "n": 2}
    shares = [share_of_rows(state, 1, context(rank, 2)) for rank in range(2)]
    for rank, share in enumerate(shares):
        rows = share_of_batch(list(range(streams)), context(rank, 2))
        assert share["n"] == 2 and share["state"]["layer.0.0"].shape == (1, len(rows), 3)
    for key, whole in state["state"].items():  # in rank order, the shares are the whole state (gather_rows)
        assert torch.equal(torch.cat([share["state"][key] for share in shares], 1), whole)
    assert share_of_rows(state, 1, DistributedContext()) is state


def test_auto_is_ddp_under_torchrun_and_nothing_in_one_process():
    assert resolve_mode("auto", 1) == "none" and resolve_mode("fsdp", 1) == "none"
    assert resolve_mode("auto", 2) == "ddp" and resolve_mode("fsdp", 4) == "fsdp"
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, DistributedContext()) is model
    with full_parameters(model) as inside:  # nothing to gather without FSDP2
        assert inside is model and type(model.weight.data) is torch.Tensor


def test_config_errors_name_the_key_and_the_world_size():
    with pytest.raises(ConfigError, match=r"train.batch_size 6 \(the global batch\) does not divide over 4 processes"):
        check_distributed_config(TrainSection(batch_size=6), 4)
    # every task and method trains in ddp and fsdp: QLoRA, GRPO and text samples included
    check_distributed_config(TrainSection(batch_size=8, sample_prompts=["ROMEO:"]), 4)
    with pytest.raises(ValueError, match="distributed"):
        TrainSection(distributed="deepspeed")


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)
    return model


def trained(model, steps: int = 3):
    optimizer = build_optimizer(model, 1e-2, 0.01, (0.9, 0.999))
    scheduler = build_scheduler(optimizer, "linear", 0, 10)
    for i in range(steps):
        model(torch.full((3, 4), float(i))).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return optimizer, scheduler


def test_a_checkpoint_keeps_the_optimizer_state_by_name_and_resumes_exactly(tmp_path):
    model = small_model()
    optimizer, scheduler = trained(model)
    save_checkpoint(tmp_path / "checkpoint-3", model, optimizer, scheduler, TrainerState(global_step=3))
    blob = torch.load(tmp_path / "checkpoint-3" / "training.pt", weights_only=False)
    assert set(blob["optimizer"]["state"]) == {"0.weight", "2.weight", "2.bias"}

    again = small_model()
    optimizer2 = build_optimizer(again, 1e-2, 0.01, (0.9, 0.999))
    scheduler2 = build_scheduler(optimizer2, "linear", 0, 10)
    state = load_checkpoint(tmp_path / "checkpoint-3", again, optimizer2, scheduler2)
    assert state.global_step == 3
    for model_, optimizer_ in ((model, optimizer), (again, optimizer2)):  # one more step each: the same weights
        model_(torch.ones(3, 4)).pow(2).sum().backward()
        optimizer_.step()
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_an_older_checkpoint_with_the_optimizer_state_by_index_still_resumes(tmp_path):
    model = small_model()
    optimizer, scheduler = trained(model)
    save_checkpoint(tmp_path / "checkpoint-3", model, optimizer, scheduler, TrainerState(global_step=3))
    path = tmp_path / "checkpoint-3" / "training.pt"
    blob = torch.load(path, weights_only=False)
    blob["optimizer"] = optimizer.state_dict()  # what tunelab wrote before checkpoints were keyed by name
    torch.save(blob, path)
    again = small_model()
    optimizer2 = build_optimizer(again, 1e-2, 0.01, (0.9, 0.999))
    load_checkpoint(tmp_path / "checkpoint-3", again, optimizer2, build_scheduler(optimizer2, "linear", 0, 10))
    assert optimizer2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
