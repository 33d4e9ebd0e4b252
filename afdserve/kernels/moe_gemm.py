"""Grouped GEMM over expert-sorted rows in Triton: ``C[r] = A[a(r)] @ B[e(r)].T``.
Legend: R sorted rows (routed rows, an upper bound), E experts, N output cols, K reduction.

Program (m, n) finds its expert from the per-expert row counts (every program recomputes
the few-hundred-element prefix sums: cheaper than another launch), so nothing is padded
and there is no host sync. ``GATHER`` reads A's rows through ``src`` (the token permute
fused into the load); ``GATED`` computes the gate rows [0, N) and the up rows [N, 2N) of B
together and stores ``silu(gate) * up`` (the activation fused into the epilogue).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _moe_gemm_kernel(a_ptr, src_ptr, b_ptr, c_ptr, counts_ptr, num_experts, N, K,
                     stride_am, stride_be, stride_bn, stride_cm,
                     GATHER: tl.constexpr, GATED: tl.constexpr, E_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     STAGES: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e_idx = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + e_idx, mask=e_idx < num_experts, other=0)
    nblk = tl.cdiv(cnt, BLOCK_M)
    blk_end = tl.cumsum(nblk, axis=0)
    if pid_m >= tl.sum(nblk):
        return
    e = tl.sum((blk_end <= pid_m).to(tl.int32))  # the expert whose block range holds pid_m
    this = e_idx == e
    first_blk = tl.sum(tl.where(this, blk_end - nblk, 0))
    row0 = tl.sum(tl.where(this, tl.cumsum(cnt, axis=0) - cnt, 0))
    rows = (pid_m - first_blk) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < tl.sum(tl.where(this, cnt, 0))
    rows = row0 + rows
    arow = rows
    if GATHER:
        arow = tl.load(src_ptr + rows, mask=rmask, other=0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + arow.to(tl.int64)[:, None] * stride_am + k[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + n.to(tl.int64)[None, :] * stride_bn + k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        kmask = k < K - k0
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


def dot_precision(x: torch.Tensor) -> str:
    """float32 operands multiply in full precision (Triton's default would be tf32)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _config(rows: int, num_experts: int, n: int, gated: bool) -> dict[str, int]:
    """Tile shape by the average rows per expert: thin tiles while weights dominate the bytes;
    narrower columns when few experts can be busy (keeps about two programs per SM)."""
    per_expert = rows / num_experts
    if per_expert <= 16:
        block_n = 64 if min(rows, num_experts) * triton.cdiv(n, 64) >= 256 else 32
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, STAGES=4, num_warps=4)
    if per_expert <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, STAGES=4, num_warps=4)
    # the gated GEMM keeps two accumulators: a 256-wide tile would not fit
    return dict(BLOCK_M=128, BLOCK_N=128 if gated else 256, BLOCK_K=64, STAGES=3, num_warps=8)


def moe_gemm(a_XK: torch.Tensor, src_R: torch.Tensor | None, w_ENK: torch.Tensor, counts_E: torch.Tensor,
             gated: bool, config: dict[str, int] | None = None) -> torch.Tensor:
    """Rows [R, N'] of the grouped GEMM; row r of expert e's segment is A[src[r]] @ w[e].T.

    ``w_ENK`` is [E, N', K] row-major (N' = 2N when ``gated``: gate rows then up rows, and
    the result is silu(gate) * up, [R, N]). Rows past the routed total stay unwritten.
    ``config`` overrides the tile shape (BLOCK_M/N/K, STAGES, num_warps), for tuning.
    """
    num_experts, n_out, k = w_ENK.shape
    n = n_out // 2 if gated else n_out
    rows = src_R.numel() if src_R is not None else a_XK.shape[0]
    assert a_XK.stride(1) == 1 and w_ENK.stride(2) == 1
    c_RN = torch.empty(rows, n, dtype=a_XK.dtype, device=a_XK.device)
    if rows == 0:
        return c_RN
    cfg = config or _config(rows, num_experts, n, gated)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]) + min(num_experts, rows), triton.cdiv(n, cfg["BLOCK_N"]))
    _moe_gemm_kernel[grid](a_XK, src_R if src_R is not None else a_XK, w_ENK, c_RN, counts_E, num_experts,
                           n, k, a_XK.stride(0), w_ENK.stride(0), w_ENK.stride(1), c_RN.stride(0),
                           GATHER=src_R is not None, GATED=gated,
                           E_PAD=max(16, triton.next_power_of_2(num_experts)), DOT_PREC=dot_precision(a_XK), **cfg)
    return c_RN
