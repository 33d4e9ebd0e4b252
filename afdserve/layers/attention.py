"""Paged causal attention over a block KV cache, plain torch (CPU path and GPU reference).
Legend: T tokens, H query heads, G kv heads, Hd head dim, NB blocks, BS block size."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from afdserve.layers.basic import apply_rope, rms_norm, to_device


@dataclass
class AttnMeta:
    """Where a batch's tokens sit. Tokens of one sequence are contiguous in the batch.

    ``q_lens[i]`` new tokens of sequence i are computed; its context after this step holds
    ``ctx_lens[i]`` tokens whose KV lives in blocks ``block_tables[i]``.
    """

    positions_T: torch.Tensor  # int64
    slot_mapping_T: torch.Tensor  # int64: block_id * BS + offset of each new token
    q_lens: list[int]
    ctx_lens: list[int]
    block_tables: list[list[int]]
    # GPU kernels' view of the lists above (``add_device_fields``); None on the CPU path
    block_tables_BM: torch.Tensor | None = None  # int32 [B, M], padded with block 0
    ctx_lens_B: torch.Tensor | None = None  # int32
    q_starts_B: torch.Tensor | None = None  # int32: first row of each sequence in the batch
    q_lens_B: torch.Tensor | None = None  # int32
    max_q_len: int = 0
    max_ctx_len: int = 0
    decode_only: bool = False  # every sequence has exactly one new token
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin of the positions, cached per forward
    num_valid_1: torch.Tensor | None = None  # CUDA graphs: int32 [1], rows from here on are padding

    @property
    def num_tokens(self) -> int:
        return int(self.positions_T.numel())


def add_device_fields(meta: AttnMeta, device: torch.device | str) -> None:
    """Fill the tensor fields the GPU kernels read, with one host-to-device copy."""
    b = len(meta.q_lens)
    width = max([len(t) for t in meta.block_tables] + [1])
    starts = list(accumulate(meta.q_lens, initial=0))[:b]
    tables = [x for t in meta.block_tables for x in t + [0] * (width - len(t))]
    packed = to_device(meta.ctx_lens + starts + meta.q_lens + tables, torch.int32, device)
    meta.ctx_lens_B, meta.q_starts_B, meta.q_lens_B = packed[:b], packed[b:2 * b], packed[2 * b:3 * b]
    meta.block_tables_BM = packed[3 * b:].view(b, width)
    meta.max_q_len, meta.max_ctx_len = max(meta.q_lens, default=0), max(meta.ctx_lens, default=0)
    meta.decode_only = all(q == 1 for q in meta.q_lens)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_TGHd: torch.Tensor,
             v_TGHd: torch.Tensor, slot_mapping_T: torch.Tensor) -> None:
    """Store the new tokens' keys/values; caches are [NB, BS, G, Hd]."""
    if k_TGHd.is_cuda:
        from afdserve.kernels.attention import write_kv_gpu  # Triton: imported only on GPU
        return write_kv_gpu(k_cache, v_cache, k_TGHd, v_TGHd, slot_mapping_T)
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping_T] = k_TGHd
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping_T] = v_TGHd


def prepare_qkv(qkv_TF: torch.Tensor, heads: int, kv_heads: int, q_norm_Hd: torch.Tensor | None,
                k_norm_Hd: torch.Tensor | None, eps: float, rope: tuple[torch.Tensor, torch.Tensor],
                k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping_T: torch.Tensor) -> torch.Tensor:
    """Split the fused projection [T, (H + 2G) * Hd] into heads, RMSNorm q and k per head
    (when the model has q/k norms), rotate them, store keys and values; returns q [T, H, Hd]."""
    if qkv_TF.is_cuda:
        from afdserve.kernels.qkv import prepare_qkv_gpu  # Triton: imported only on GPU
        return prepare_qkv_gpu(qkv_TF, heads, kv_heads, q_norm_Hd, k_norm_Hd, eps, *rope, k_cache, v_cache,
                               slot_mapping_T)
    hd = k_cache.shape[3]
    q, k, v = qkv_TF.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q, k, v = q.unflatten(-1, (heads, hd)), k.unflatten(-1, (kv_heads, hd)), v.unflatten(-1, (kv_heads, hd))
    if q_norm_Hd is not None:
        q, k = rms_norm(q, q_norm_Hd, eps), rms_norm(k, k_norm_Hd, eps)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    write_kv(k_cache, v_cache, k, v, slot_mapping_T)
    return q


def paged_attention(q_THHd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttnMeta, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached context."""
    if q_THHd.is_cuda:
        from afdserve.kernels.attention import paged_attention_gpu  # Triton: imported only on GPU
        return paged_attention_gpu(q_THHd, k_cache, v_cache, meta, scale)
    out_THHd = torch.empty_like(q_THHd)
    start = 0
    for q_len, ctx_len, table in zip(meta.q_lens, meta.ctx_lens, meta.block_tables):
        q_HQHd = q_THHd[start:start + q_len].transpose(0, 1)
        k_HCHd, v_HCHd = (_gather(c, table, ctx_len, q_THHd.shape[1]) for c in (k_cache, v_cache))
        # query j sits at position ctx_len - q_len + j and sees keys 0..that position
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q_THHd.device)
        mask_QC = torch.arange(ctx_len, device=q_THHd.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q_HQHd, k_HCHd, v_HCHd, attn_mask=mask_QC, scale=scale)
        out_THHd[start:start + q_len] = o.transpose(0, 1)
        start += q_len
    return out_THHd


def _gather(cache: torch.Tensor, table: list[int], ctx_len: int, num_heads: int) -> torch.Tensor:
    """A sequence's first ctx_len cached rows as [H, C, Hd], kv heads repeated for GQA."""
    block_size = cache.shape[1]
    blocks = torch.tensor(table[: (ctx_len + block_size - 1) // block_size], device=cache.device)
    rows_CGHd = cache[blocks].flatten(0, 1)[:ctx_len]
    return rows_CGHd.repeat_interleave(num_heads // cache.shape[2], dim=1).transpose(0, 1)
