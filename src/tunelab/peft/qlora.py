"""QLoRA's frozen 4-bit base weights (Dettmers et al. 2023) through torchao's NF4 tensor.

NormalFloat4 stores each weight as a 4-bit index into 16 quantiles of N(0, 1), scaled per block of 64
weights by the block's absmax (sec. 3, eq. 4); the absmax scalers are themselves quantised to int8 per block
of 256 scalers ("double quantisation", sec. 3). In use the weight is dequantised to the input's dtype for
each matmul, Y = X dequant(W_NF4), and never receives a gradient.

torchao is imported only when a weight is quantised, so models without QLoRA never load it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

BLOCK_SIZE = 64  # weights per absmax scaler (QLoRA's choice)
SCALER_BLOCK_SIZE = 256  # scalers per int8 double-quantisation block (QLoRA's choice)

# torchao moved the NF4 code between releases; the newest location first.
_NF4_MODULES = ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor")


def _nf4_module():
    """torchao's NF4 module (imports torchao on first use)."""
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

        return nf4_tensor
    except ImportError:
        pass
    try:
        from torchao.dtypes import nf4tensor

        return nf4tensor
    except ImportError as e:  # pragma: no cover - torchao is a dependency
        raise ImportError("QLoRA needs torchao (pip install torchao)") from e


def is_nf4(tensor: object) -> bool:
    """Whether `tensor` is torchao's NF4Tensor (False without importing torchao if it was never loaded)."""
    for name in _NF4_MODULES:
        module = sys.modules.get(name)
        if module is not None and isinstance(tensor, module.NF4Tensor):
            return True
    return False


def scaler_block_size(numel: int, block_size: int = BLOCK_SIZE) -> int:
    """The double-quantisation block: 256 scalers, or the largest divisor of the scaler count below it.

    torchao needs the number of 64-weight blocks to be a multiple of the scaler block, which holds for
    layers of 16384 weights and more; smaller layers (tiny test models) use a smaller scaler block.
    """
    n_blocks = numel // block_size
    for size in range(min(SCALER_BLOCK_SIZE, n_blocks), 0, -1):
        if n_blocks % size == 0:
            return size
    return 1


def to_nf4(weight: torch.Tensor, *, block_size: int = BLOCK_SIZE, name: str = "weight") -> torch.Tensor:
    """An NF4Tensor of `weight` [out, in] (blocks of 64, scaler blocks of 256); ValueError if it cannot be."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: NF4 quantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.numel() % block_size:
        raise ValueError(
            f"{name}: {weight.numel()} weights ({tuple(weight.shape)}) are not a multiple of the NF4 block size "
            f"{block_size}; leave this layer out of target_modules or disable quantize_base"
        )
    weight = weight.detach().contiguous()
    nf4 = _nf4_module().to_nf4(weight, block_size, scaler_block_size(weight.numel(), block_size))
    if not torch.isfinite(dequantize(nf4)).all():
        raise ValueError(f"{name}: NF4 quantisation produced non-finite values (degenerate block scales)")
    return nf4


def dequantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense copy of an NF4 weight (in `dtype`, default its original dtype); other tensors pass through."""
    if is_nf4(weight):
        return weight.get_original_weight().to(dtype or weight.dtype)
    return weight if dtype is None else weight.to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b, dequantising an NF4 weight to x's dtype inside the matmul (no dense copy kept for backward).
    A bf16 base (lora.cast_frozen_base) called outside autocast with fp32 inputs is cast to them."""
    if is_nf4(weight):
        out = _nf4_module().linear_nf4(x, weight)
        return out if bias is None else out + bias
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        weight = weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    return F.linear(x, weight, bias)


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really occupies: the packed data, scalers and lookup table of an NF4 tensor."""
    if is_nf4(tensor):
        inner, _ = tensor.__tensor_flatten__()
        return sum(getattr(tensor, name).nbytes for name in inner)
    return tensor.numel() * tensor.element_size()
