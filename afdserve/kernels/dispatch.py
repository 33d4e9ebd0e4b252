"""Expert-sorted placement of routed rows: which row of the grouped GEMM each (token, k) takes.
Legend: T tokens, K top-k, E local experts, N = T*K rows (an upper bound on routed rows).

No host synchronisation. Pairs that fit one chunk (decode: a few tokens) take one launch,
``_place_one_kernel``: the histogram, its prefix sum and every pair's rank in one program.
More take three (a zero-fill of the counters, then): ``_count_kernel`` builds the per-expert
histogram with atomics; ``_place_kernel`` gives every chunk of (token, k) pairs a run of rows
inside each expert's segment (one atomic per expert per chunk) and ranks the chunk's pairs
inside it with a one-hot prefix sum. Rows of one expert are contiguous; their order inside the
segment depends on which chunk reserved first, which changes no result: every row's GEMM is
independent of its neighbours, and ``combine`` gathers a token's k rows in fixed k order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class ExpertDispatch:
    """Where the routed rows go; every tensor lives on the GPU (no host sync to build it)."""

    pos_TK: torch.Tensor  # int32: row of (token, k) in expert-sorted order, -1 = not held here
    src_N: torch.Tensor  # int32: token of each sorted row (rows past the routed total: unset)
    counts_E: torch.Tensor  # int32: rows per expert
    ends_E: torch.Tensor  # int32: inclusive prefix sum of counts_E (grouped GEMM offsets)

    @property
    def max_rows(self) -> int:
        return self.src_N.numel()


def _chunk(num_experts: int) -> tuple[int, int]:
    """(pairs per program, padded expert count): a one-hot tile of about 8k elements."""
    e_pad = max(16, triton.next_power_of_2(num_experts))
    return max(16, min(256, 8192 // e_pad)), e_pad


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, n, num_experts, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
    e = tl.arange(0, E_PAD)
    cnt = tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + e, cnt, mask=(e < num_experts) & (cnt > 0))


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, cursor_ptr, pos_ptr, src_ptr, ends_ptr, n, num_experts, top_k,
                  BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
    ids = tl.where(ids < num_experts, ids, -1)
    e = tl.arange(0, E_PAD)
    hit = (ids[:, None] == e[None, :]).to(tl.int32)  # [BLOCK, E_PAD] one-hot
    rank = tl.sum(tl.cumsum(hit, axis=0) * hit, axis=1) - 1  # rank among this chunk's rows of that expert
    cnt = tl.sum(hit, axis=0)
    counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    ends = tl.cumsum(counts, axis=0)
    reserve = (e < num_experts) & (cnt > 0)
    base = tl.atomic_add(cursor_ptr + e, cnt, mask=reserve)
    start = tl.where(reserve, ends - counts + base, 0)
    row = tl.sum(hit * start[None, :], axis=1) + rank
    held = ids >= 0
    tl.store(pos_ptr + offs, tl.where(held, row, -1), mask=offs < n)
    tl.store(src_ptr + row, offs // top_k, mask=held & (offs < n))
    tl.store(ends_ptr + e, ends, mask=(e < num_experts) & (tl.program_id(0) == 0))


@triton.jit
def _place_one_kernel(ids_ptr, counts_ptr, pos_ptr, src_ptr, ends_ptr, n, num_experts, top_k,
                      BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
    ids = tl.where(ids < num_experts, ids, -1)
    e = tl.arange(0, E_PAD)
    hit = (ids[:, None] == e[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(hit, axis=0) * hit, axis=1) - 1
    counts = tl.sum(hit, axis=0)
    ends = tl.cumsum(counts, axis=0)
    row = tl.sum(hit * (ends - counts)[None, :], axis=1) + rank
    held = ids >= 0
    tl.store(pos_ptr + offs, tl.where(held, row, -1), mask=offs < n)
    tl.store(src_ptr + row, offs // top_k, mask=held & (offs < n))
    tl.store(counts_ptr + e, counts, mask=e < num_experts)
    tl.store(ends_ptr + e, ends, mask=e < num_experts)


def dispatch_rows(topk_ids_TK: torch.Tensor, num_experts: int) -> ExpertDispatch:
    """Expert-sorted rows of every (token, k) whose id is in [0, num_experts)."""
    t, k = topk_ids_TK.shape
    n, dev = t * k, topk_ids_TK.device
    ids_N = topk_ids_TK.reshape(-1).contiguous()
    block, e_pad = _chunk(num_experts)
    pos_TK = torch.empty(t, k, dtype=torch.int32, device=dev)
    src_N = torch.empty(n, dtype=torch.int32, device=dev)
    ends_E = torch.empty(num_experts, dtype=torch.int32, device=dev)
    if 0 < n <= block:
        counts_E = torch.empty(num_experts, dtype=torch.int32, device=dev)
        _place_one_kernel[(1,)](ids_N, counts_E, pos_TK, src_N, ends_E, n, num_experts, k, BLOCK=block, E_PAD=e_pad)
        return ExpertDispatch(pos_TK, src_N, counts_E, ends_E)
    scratch = torch.zeros(2, e_pad, dtype=torch.int32, device=dev)  # counts, cursors
    grid = (triton.cdiv(n, block),)
    if n:
        _count_kernel[grid](ids_N, scratch[0], n, num_experts, BLOCK=block, E_PAD=e_pad)
        _place_kernel[grid](ids_N, scratch[0], scratch[1], pos_TK, src_N, ends_E, n, num_experts, k,
                            BLOCK=block, E_PAD=e_pad)
    else:
        ends_E.zero_()
    return ExpertDispatch(pos_TK, src_N, scratch[0, :num_experts], ends_E)
