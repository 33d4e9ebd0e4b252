"""Helpers of the GPU kernel tests. Legend: T tokens, D hidden.

The tests run on CUDA in bf16. Without CUDA they skip, unless ``TRITON_INTERPRET=1`` and
Triton is installed: then they run on the CPU through Triton's interpreter in float16 (its
bf16 loads are broken), a slow check of the kernels' logic for machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

REL_TOL = 2e-2  # bf16 operands: relative error ||out - ref|| / ||ref|| against a float32 reference


def backend() -> tuple[str, torch.dtype] | None:
    """(device, dtype) the kernels run on here, or None when they cannot run."""
    if importlib.util.find_spec("triton") is None:
        return None
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu", torch.float16
    return None


def interpreted() -> bool:
    return not torch.cuda.is_available()


def poison(device: str) -> None:
    """Fill freed allocator memory with NaN, so an output element a kernel never writes shows up."""
    if device == "cuda":  # the caching allocator keeps small (< 1 MB) and large blocks apart
        blocks = [torch.empty(1 << 17, device=device) for _ in range(64)] + [torch.empty(64 << 20, device=device)]
        for b in blocks:
            b.fill_(float("nan"))
        torch.cuda.synchronize()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives NaN (which fails any bound)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
