"""Which floating-point formats this machine computes natively."""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_computes_bf16() -> bool:
    """True where the CPU has bf16 instructions (AVX512-BF16 or AMX) that oneDNN uses: bf16 matmuls run faster
    than fp32 there, and slower without them."""
    check = getattr(torch.backends.mkldnn, "is_bf16_supported", None) or getattr(
        torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return bool(check()) if check else False
    except Exception:
        return False
