"""Scale-out with torchrun: the process group, the model wrapped for DDP or FSDP2, and the few collectives the
Trainer needs. Nothing here is home-made parallelism: torch.distributed does the communication.

`torchrun --nproc-per-node N -m tunelab train CONFIG` starts N processes with RANK, LOCAL_RANK and WORLD_SIZE
in their environment. Every process reads the same data and computes the same seeded batch order;
train.batch_size stays the global batch and each process trains on its share of the rows of each batch
(`share_of_batch`). Each objective is divided by its targets over the whole global accumulation group (the
counts are all-reduced), and the loss is multiplied by the world size because DDP and FSDP2 average the
gradients over processes: the averaged gradient is then exactly the gradient of one process on the whole
batch, up to the order of float additions.

A task step whose carried state has one row per batch row (a recurrent LM's state, one row per stream) keeps
its own rows in each process; a checkpoint holds the rows of every process, gathered (`gather_rows`), and a
resumed process takes its share back (`share_of_rows`), so the checkpoint does not depend on the world size.

Every task and method trains under FSDP2. QLoRA's NF4 base weights stay whole on every process (wrap_model).
Decoding (GRPO's sampling and evaluation, train.sample_prompts) runs a forward pass per new token, as many as
this process's completions need, or on rank 0 alone: it runs inside `full_parameters`, where the parameters are
gathered once and no forward pass is collective.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tunelab.errors import ConfigError
from tunelab.models.base import transformer_blocks


@dataclass
class DistributedContext:
    """Where this process stands: mode "none" (one process), "ddp" or "fsdp"; rank and world size."""

    mode: str = "none"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # None: keep the model where it is (one process)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory, logs, evaluates and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64, so that target counts stay exact)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast(self, value):
        """Rank 0's `value` on every process (any picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def gather(self, value) -> list:
        """Every process's `value` (any picklable object), in rank order, on every process."""
        if not self.enabled:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when started without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_mode(setting: str, world_size: int) -> str:
    """train.distributed for this launch: auto is ddp under torchrun with more than one process, else none."""
    if world_size <= 1:
        return "none"
    return "ddp" if setting == "auto" else setting


def setup_distributed(settings) -> DistributedContext:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA, one GPU per LOCAL_RANK) as train.distributed
    says; a plain one-process context without torchrun. Checks the global batch divides over the processes."""
    world_size = launched_world_size()
    mode = resolve_mode(settings.distributed, world_size)
    if mode == "none":
        return DistributedContext()
    check_distributed_config(settings, world_size)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistributedContext(mode, rank, local_rank, world_size, device)


def check_distributed_config(settings, world_size: int) -> None:
    """One clear line for a config that cannot train on `world_size` processes. Every task and method trains
    in both modes: the only condition is a global batch that divides over the processes."""
    if settings.batch_size % world_size:
        raise ConfigError(f"train.batch_size {settings.batch_size} (the global batch) does not divide over "
                          f"{world_size} processes (WORLD_SIZE); choose a multiple of {world_size}")


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def share_of_batch(indices: list[int], context: DistributedContext) -> list[int]:
    """This process's rows of a global batch: contiguous, as even as possible (the first ranks take one more row
    when the batch does not divide; a short last batch can leave a rank with none)."""
    if not context.enabled:
        return list(indices)
    per, extra = divmod(len(indices), context.world_size)
    start = context.rank * per + min(context.rank, extra)
    return list(indices[start:start + per + (1 if context.rank < extra else 0)])


def gather_rows(state, dim: int, context: DistributedContext):
    """`state` (a tensor or a dict of them, nested dicts allowed) of the whole global batch: each tensor's rows
    along `dim` from every process, concatenated in rank order (the order of share_of_batch). A collective:
    every process calls it and gets the whole state."""
    return _concat_rows(context.gather(state), dim) if context.enabled else state


def _concat_rows(parts: list, dim: int):
    first = parts[0]
    if torch.is_tensor(first):
        return torch.cat(parts, dim)
    if isinstance(first, dict):
        return {key: _concat_rows([part[key] for part in parts], dim) for key in first}
    return first


def share_of_rows(state, dim: int, context: DistributedContext):
    """This process's rows (share_of_batch) along `dim` of each tensor of a whole-batch `state`: the inverse of
    gather_rows."""
    if not context.enabled:
        return state
    if isinstance(state, dict):
        return {key: share_of_rows(value, dim, context) for key, value in state.items()}
    if not torch.is_tensor(state):
        return state
    rows = share_of_batch(list(range(state.shape[dim])), context)
    return state.index_select(dim, torch.tensor(rows, dtype=torch.long, device=state.device))


# ---------------------------------------------------------------------------------------------- the model


def wrap_model(model: torch.nn.Module, context: DistributedContext) -> torch.nn.Module:
    """The model the training forward passes go through: DDP around it, or FSDP2 applied to each Transformer
    block (each child of a ModuleList named *layers) and then to the whole model; the model itself with one
    process. FSDP2 changes `model` in place (its parameters become DTensor shards).

    QLoRA's frozen NF4 base weights (torchao's tensor subclass, which FSDP2 cannot shard) are FSDP2's
    ignored_params: each process keeps them whole, as it would under DDP (at 4 bits a weight, with their block
    scales, about an eighth of the memory of fp32 weights); the LoRA adapters and every other parameter are
    sharded.

    The layers of a recurrent model (torch's nn.RNN / LSTM / GRU) are sharded with the whole model, not one by
    one: weight dropout runs a layer through torch.func.functional_call with a dropped-out copy of W_hh, which
    a layer's own FSDP2 pre-forward hook would replace by the gathered weight."""
    if context.mode == "none":
        return model
    model.to(context.device)
    if context.mode == "ddp":
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        # init_sync off: every process built the same model from the same files and seed, and broadcasting
        # the frozen NF4 base weights of QLoRA (a torchao tensor subclass) is not needed
        return ModelDDP(model, device_ids=device_ids, init_sync=False)
    from torch.distributed.fsdp import fully_shard

    from tunelab.peft.qlora import is_nf4

    whole = {param for param in model.parameters() if is_nf4(param)} or None
    for block in transformer_blocks(model):
        fully_shard(block, ignored_params=whole)
    fully_shard(model, ignored_params=whole)
    return model


class ModelDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP whose other attributes are the model's: a task step reads model.heads (the LM head applied to the
    hidden states in chunks, outside forward) and model.config. The gradients of parameters used outside
    forward are all-reduced all the same: DDP's reducer hooks fire as each gradient is accumulated."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper (an FSDP2 model is its own module)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """A context in which backward all-reduces (or reduce-scatters) gradients only when `sync`: the last
    micro-batch of an accumulation group."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module, enabled: bool = True):
    """A context in which an FSDP2-sharded `model` has every parameter whole on every process, so that its
    forward passes make no collectives: for decoding, where each process runs as many forward passes as its
    own completions need (GRPO's sampling) or rank 0 generates alone (train.sample_prompts, GRPO's greedy
    evaluation). Without FSDP2, or with `enabled` false, it does nothing.

    Entering and leaving are collectives: every process enters, whether or not it generates. On entering,
    each FSDP2 module all-gathers its parameters (unshard) and stops resharding after its forward passes; on
    leaving, each frees the gathered parameters (reshard, back to the shards, which the context never changed)
    and reshards after forward again as wrap_model left it (FSDP2's default: the blocks do, the root keeps its
    parameters from forward to backward). The full parameters cost their memory on every process while
    inside; the inference-only copies of weights that decoding caches (nn/packed.py) are dropped on leaving."""
    if not (enabled and is_sharded(model)):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    from tunelab.nn.packed import forget_packed_weights

    modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield model
    finally:
        forget_packed_weights(model)
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)
