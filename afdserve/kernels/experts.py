"""Expert FFN on the GPU as grouped GEMMs over expert-sorted rows (same function as
``afdserve.layers.moe.expert_ffn``). Legend: T tokens, D hidden, K top-k, E local experts,
F = 2*I gate+up rows, I intermediate, N = T*K sorted rows (an upper bound on routed rows).

    dispatch_rows -> rows sorted by expert (pos_TK, src_N, counts_E, ends_E)
    grouped_mm:   permute x once -> _grouped_mm(w13) -> silu*up -> _grouped_mm(w2)
    triton:       moe_gemm(w13, gather + silu*up fused) -> moe_gemm(w2)
    combine:      y[t] = sum_k w[t,k] * rows[pos[t,k]]  (a gather in fixed k order: deterministic)

``torch._grouped_mm`` (CUTLASS) wins where each expert sees many rows; the Triton kernel's
thin tiles win where the weights dominate the bytes (decode). ``impl="auto"`` picks by the
average rows per expert, a threshold measured by ``benchmarks/gpu_kernels.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from afdserve.kernels.dispatch import ExpertDispatch, dispatch_rows
from afdserve.kernels.moe_gemm import moe_gemm

GROUPED_MM_MIN_ROWS_PER_EXPERT = 256.0  # below this average, impl="auto" takes the Triton GEMM


@triton.jit
def _permute_kernel(x_ptr, pos_ptr, xs_ptr, D, top_k, BLOCK_D: tl.constexpr):
    t, d = tl.program_id(0), tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + t.to(tl.int64) * D + d, mask=d < D)
    for k in range(top_k):
        row = tl.load(pos_ptr + t * top_k + k).to(tl.int64)
        tl.store(xs_ptr + row * D + d, x, mask=(d < D) & (row >= 0))


@triton.jit
def _silu_mul_kernel(h_ptr, ends_ptr, act_ptr, num_experts, inter, BLOCK_I: tl.constexpr):
    r, i = tl.program_id(0), tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    if r >= tl.load(ends_ptr + num_experts - 1):
        return  # past the routed rows: never read
    base = r.to(tl.int64) * 2 * inter
    gate = tl.load(h_ptr + base + i, mask=i < inter).to(tl.float32)
    up = tl.load(h_ptr + base + inter + i, mask=i < inter).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(act_ptr + r.to(tl.int64) * inter + i, act.to(act_ptr.dtype.element_ty), mask=i < inter)


@triton.jit
def _combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, D, top_k, BLOCK_D: tl.constexpr):
    t, d = tl.program_id(0), tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(top_k):
        row = tl.load(pos_ptr + t * top_k + k).to(tl.int64)
        w = tl.load(w_ptr + t * top_k + k).to(tl.float32)
        y = tl.load(y_ptr + row * D + d, mask=(d < D) & (row >= 0), other=0.0)
        acc += w * y.to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * D + d, acc.to(out_ptr.dtype.element_ty), mask=d < D)


def combine(y_ND: torch.Tensor, pos_TK: torch.Tensor, topk_w_TK: torch.Tensor) -> torch.Tensor:
    """[T, D]: each token's weighted sum of its routed rows (rows at pos < 0 add nothing)."""
    t, k = pos_TK.shape
    d = y_ND.shape[1]
    out_TD = torch.empty(t, d, dtype=y_ND.dtype, device=y_ND.device)
    if t:
        _combine_kernel[(t, triton.cdiv(d, 1024))](y_ND, pos_TK, topk_w_TK.contiguous(), out_TD, d, k,
                                                   BLOCK_D=1024)
    return out_TD


def _grouped_mm_rows(x_TD: torch.Tensor, disp: ExpertDispatch, w13_EFD: torch.Tensor,
                     w2_EDI: torch.Tensor) -> torch.Tensor:
    """Routed rows through torch._grouped_mm: one permute copy, two grouped GEMMs."""
    (t, d), k = x_TD.shape, disp.pos_TK.shape[1]
    n, num_experts, i = disp.max_rows, w13_EFD.shape[0], w2_EDI.shape[2]
    xs_ND = torch.empty(n, d, dtype=x_TD.dtype, device=x_TD.device)
    _permute_kernel[(t, triton.cdiv(d, 1024))](x_TD, disp.pos_TK, xs_ND, d, k, BLOCK_D=1024)
    h_NF = torch._grouped_mm(xs_ND, w13_EFD.transpose(1, 2), offs=disp.ends_E)
    act_NI = torch.empty(n, i, dtype=x_TD.dtype, device=x_TD.device)
    _silu_mul_kernel[(n, triton.cdiv(i, 1024))](h_NF, disp.ends_E, act_NI, num_experts, i, BLOCK_I=1024)
    return torch._grouped_mm(act_NI, w2_EDI.transpose(1, 2), offs=disp.ends_E)


def _grouped_mm_ok(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor) -> bool:
    """CUTLASS grouped GEMM: bf16 only, every row stride a multiple of 16 bytes."""
    dims = (x_TD.shape[1], w13_EFD.shape[1], w2_EDI.shape[2])
    return x_TD.dtype == torch.bfloat16 and all(d % 8 == 0 for d in dims)


def fused_experts(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_w_TK: torch.Tensor,
                  w13_EFD: torch.Tensor, w2_EDI: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Sum over each token's experts of w_k * down(silu(gate(x)) * up(x)); ids < 0 add nothing.

    ``impl``: "grouped_mm" (torch._grouped_mm), "triton" (``moe_gemm``) or "auto".
    Accumulates the k terms in float32 (the CPU path adds in the input dtype).
    """
    t, k = topk_ids_TK.shape
    num_experts = w13_EFD.shape[0]
    if t == 0 or num_experts == 0:
        return torch.zeros_like(x_TD)
    x_TD, w13_EFD, w2_EDI = x_TD.contiguous(), w13_EFD.contiguous(), w2_EDI.contiguous()
    disp = dispatch_rows(topk_ids_TK, num_experts)
    if impl == "auto":
        big = t * k / num_experts >= GROUPED_MM_MIN_ROWS_PER_EXPERT
        impl = "grouped_mm" if big and _grouped_mm_ok(x_TD, w13_EFD, w2_EDI) else "triton"
    if impl == "grouped_mm":
        y_ND = _grouped_mm_rows(x_TD, disp, w13_EFD, w2_EDI)
    else:
        act_NI = moe_gemm(x_TD, disp.src_N, w13_EFD, disp.counts_E, gated=True)
        y_ND = moe_gemm(act_NI, None, w2_EDI, disp.counts_E, gated=False)
    return combine(y_ND, disp.pos_TK, topk_w_TK)
