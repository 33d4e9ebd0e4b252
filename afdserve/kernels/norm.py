"""RMSNorm on the GPU in one launch (same function as ``afdserve.layers.basic.rms_norm``), and
the residual add fused in front of it (``add_rms_norm``). Legend: T tokens, D hidden.

HF's order of operations, rounding included: the sum is rounded to the activation dtype,
normalised in float32, cast back, then scaled by the weight (a product rounded once more).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, a_ptr, w_ptr, y_ptr, s_ptr, D, stride_x, stride_a, eps,
                     ADD: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    x = tl.load(x_ptr + t * stride_x + d, mask=mask, other=0.0)
    if ADD:
        a = tl.load(a_ptr + t * stride_a + d, mask=mask, other=0.0)
        x = (x.to(tl.float32) + a.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + t * D + d, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    xn = (xf * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * D + d, (w * xn).to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x_TD: torch.Tensor, a_TD: torch.Tensor | None, w_D: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    t, d = x_TD.shape
    assert x_TD.stride(1) == 1 and (a_TD is None or a_TD.stride(1) == 1) and w_D.is_contiguous()
    y_TD = torch.empty(t, d, dtype=torch.promote_types(w_D.dtype, x_TD.dtype), device=x_TD.device)
    s_TD = torch.empty_like(x_TD, memory_format=torch.contiguous_format) if a_TD is not None else x_TD
    if t:
        block = triton.next_power_of_2(d)
        _rms_norm_kernel[(t,)](x_TD, a_TD if a_TD is not None else x_TD, w_D, y_TD, s_TD, d, x_TD.stride(0),
                               a_TD.stride(0) if a_TD is not None else 0, eps, ADD=a_TD is not None,
                               BLOCK_D=block, num_warps=max(1, min(16, block // 256)))
    return y_TD, s_TD


def rms_norm_gpu(x: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    """``w * rmsnorm(x)`` over the last dimension of ``x`` (any leading shape)."""
    d = x.shape[-1]
    x_TD = x.reshape(-1, d)
    return _launch(x_TD, None, w_D, eps)[0].view(*x.shape[:-1], d)


def add_rms_norm_gpu(x_TD: torch.Tensor, a_TD: torch.Tensor, w_D: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``w * rmsnorm(x + a)``, ``x + a``) in one launch."""
    return _launch(x_TD, a_TD, w_D, eps)
