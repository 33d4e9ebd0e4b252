"""Router on the GPU: the gate GEMM (cuBLAS) then one Triton kernel for softmax (float32),
top-k, optional renormalisation and the per-expert token counts (the load statistics and
the sizes a dispatch needs). Same function as ``afdserve.layers.moe.route``.
Legend: T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _topk_kernel(logits_ptr, ids_ptr, w_ptr, counts_ptr, valid_ptr, T, E, stride_t, K: tl.constexpr,
                 RENORM: tl.constexpr, COUNT: tl.constexpr, VALID: tl.constexpr, BLOCK_T: tl.constexpr,
                 E_PAD: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, E_PAD)
    tmask, emask = t < T, e < E
    routed = tmask
    if VALID:  # rows past the device-side count (CUDA-graph padding) choose no expert: id -1, weight 0
        routed = t < tl.load(valid_ptr)
    x = tl.load(logits_ptr + t.to(tl.int64)[:, None] * stride_t + e[None, :],
                mask=tmask[:, None] & emask[None, :], other=float("-inf")).to(tl.float32)
    x = tl.where(tmask[:, None], x, 0.0)  # padding rows: finite, never stored
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    left = tl.where(emask[None, :], p, -1.0)  # a chosen or padded expert reads -1 (< any prob)
    for _ in tl.static_range(K):
        best = tl.max(left, axis=1)
        idx = tl.min(tl.where(left == best[:, None], e[None, :], E_PAD), axis=1)  # lowest id on ties
        left = tl.where(e[None, :] == idx[:, None], -1.0, left)
    total = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
    if RENORM:
        total = tl.sum(tl.where((left < 0) & emask[None, :], p, 0.0), axis=1)
    left = tl.where(emask[None, :], p, -1.0)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for k in tl.static_range(K):
        best = tl.max(left, axis=1)
        idx = tl.min(tl.where(left == best[:, None], e[None, :], E_PAD), axis=1)
        hit = e[None, :] == idx[:, None]
        left = tl.where(hit, -1.0, left)
        tl.store(ids_ptr + t * K + k, tl.where(routed, idx.to(tl.int64), -1), mask=tmask)
        tl.store(w_ptr + t * K + k, tl.where(routed, best / total, 0.0), mask=tmask)
        counts += tl.sum((hit & routed[:, None]).to(tl.int32), axis=0)
    if COUNT:
        tl.atomic_add(counts_ptr + e, counts, mask=emask & (counts > 0))


def fused_topk(logits_TE: torch.Tensor, top_k: int, renormalize: bool, count: bool = True,
               num_valid_1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(topk_ids_TK int64, topk_w_TK float32 descending, counts_E int32) from router logits;
    ``count=False`` skips the counts (None) and their zero-fill launch. With ``num_valid_1``
    (a one-element int32 device tensor) rows from that count on get id -1 and weight 0."""
    t, num_experts = logits_TE.shape
    ids_TK = torch.empty(t, top_k, dtype=torch.int64, device=logits_TE.device)
    w_TK = torch.empty(t, top_k, dtype=torch.float32, device=logits_TE.device)
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=logits_TE.device) if count else None
    e_pad = max(16, triton.next_power_of_2(num_experts))
    block_t = max(1, min(64, 4096 // e_pad))
    if t:
        logits_TE = logits_TE.contiguous()
        _topk_kernel[(triton.cdiv(t, block_t),)](
            logits_TE, ids_TK, w_TK, counts_E if count else ids_TK, ids_TK if num_valid_1 is None else num_valid_1,
            t, num_experts, logits_TE.stride(0), K=top_k, RENORM=renormalize, COUNT=count,
            VALID=num_valid_1 is not None, BLOCK_T=block_t, E_PAD=e_pad)
    return ids_TK, w_TK, counts_E


def route_gpu(x_TD: torch.Tensor, gate_ED: torch.Tensor, top_k: int, renormalize: bool,
              num_valid_1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router: (topk_ids_TK int64, topk_w_TK float32), as ``layers.moe.route``."""
    ids_TK, w_TK, _ = fused_topk(F.linear(x_TD, gate_ED), top_k, renormalize, count=False, num_valid_1=num_valid_1)
    return ids_TK, w_TK
