"""AdamW with decoupled weight decay (Loshchilov & Hutter 2019) and warm-up schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY = ("bias", "norm", "embeddings.norm", "lora_magnitude")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), *,
                    fused: bool = True) -> torch.optim.AdamW:
    """AdamW over trainable parameters; biases and norm gains are not decayed.

    The fused kernel (one pass over each parameter for the whole update) where it applies: plain tensors on a
    CPU or GPU. On 2 CPU cores it updates MiniLM-L6's 22.7M parameters in 6.7 ms, against 37.6 ms for the
    multi-tensor ("foreach") path, which still serves sharded (FSDP2 DTensor) parameters and fused=False
    (train.fused_optimizer). The two round differently: on the tiny recurrent-LM torchrun test (lr 1e-2, 14
    steps) 2 processes stay within 3.8e-7 of 1 process with the multi-tensor path and drift to 1.2e-5 with the
    fused kernel.
    """
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 or any(k in name for k in NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    plain = all(type(p.data) is torch.Tensor and p.is_floating_point() for p in params)
    devices = {p.device.type for p in params}
    kind = {"fused": True} if fused and plain and devices in ({"cpu"}, {"cuda"}) else {"foreach": True}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, **kind)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak lr at each step: linear warm-up, then linear decay to 0, cosine, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def build_scheduler(optimizer, schedule: str, warmup: float, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps = int(warmup * total_steps) if warmup < 1 else int(warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps))
