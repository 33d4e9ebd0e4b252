"""Paged attention on the GPU (Triton), same function as ``afdserve.layers.attention``.
Legend: B sequences, T tokens, H query heads, G kv heads, QH = H/G query heads per kv head,
Hd head dim, NB blocks, BS block size, M max blocks per sequence, S KV splits.

- ``decode_attention``: one query per sequence. Program (b, g, s) reads split s of
  sequence b's keys/values of kv head g once for all QH query heads (GQA: the heads form
  the rows of one tile); a second kernel merges the splits by their log-sum-exp.
- ``prefill_attention``: variable-length causal, mixed prefill and decode sequences.
  Program (b, q-block, g) holds a few query tokens x QH heads as 64 rows and walks the
  paged keys up to its last query's position.
- ``write_kv``: keys and values of the new tokens in one launch (slots < 0 skipped).
Softmax in float32 with exp2 (log2(e) folded into the scale).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from afdserve.kernels.moe_gemm import dot_precision
from afdserve.layers.attention import AttnMeta, add_device_fields

_LOG2E = 1.4426950408889634


@triton.jit
def _kv_tile(cache_ptr, table_ptr, n, nmask, g, d, dmask, stride_b, stride_s, stride_g, BS: tl.constexpr):
    """[BLOCK_N, HD_PAD] rows n of one sequence's paged cache for kv head g."""
    blk = tl.load(table_ptr + n // BS, mask=nmask, other=0).to(tl.int64)
    row = blk * stride_b + (n % BS) * stride_s + g * stride_g
    return tl.load(cache_ptr + row[:, None] + d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, o_ptr, part_ptr, lse_ptr, qk_scale,
                   tokens_per_split, num_splits, stride_qt, stride_qh, stride_tb, stride_kb, stride_ks,
                   stride_kg, stride_ot, stride_oh,
                   QH: tl.constexpr, QH_PAD: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr,
                   BS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    b, g, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    start = s * tokens_per_split
    end = tl.minimum(ctx, start + tokens_per_split)
    h = tl.arange(0, QH_PAD)
    d = tl.arange(0, HD_PAD)
    hmask, dmask = h < QH, d < HD
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + (g * QH + h)[:, None] * stride_qh + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    table = table_ptr + b.to(tl.int64) * stride_tb
    m_i = tl.full([QH_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([QH_PAD], dtype=tl.float32)
    acc = tl.zeros([QH_PAD, HD_PAD], dtype=tl.float32)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        k = _kv_tile(k_ptr, table, n, nmask, g, d, dmask, stride_kb, stride_ks, stride_kg, BS)
        v = _kv_tile(v_ptr, table, n, nmask, g, d, dmask, stride_kb, stride_ks, stride_kg, BS)
        x = tl.where(nmask[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        p = tl.exp2(x - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    hd_mask = hmask[:, None] & dmask[None, :]
    if SPLIT:  # partials [B, H, S, HD_PAD] float32 and their log2-sum-exp [B, H, S]
        row = (b * QH * tl.num_programs(1) + g * QH + h) * num_splits + s
        tl.store(part_ptr + row.to(tl.int64)[:, None] * HD_PAD + d[None, :], out, mask=hd_mask)
        tl.store(lse_ptr + row, tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf")), mask=hmask)
    else:
        o = o_ptr + b.to(tl.int64) * stride_ot + (g * QH + h)[:, None] * stride_oh + d[None, :]
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=hd_mask)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, o_ptr, num_heads, num_splits, stride_ot, stride_oh,
                  HD: tl.constexpr, HD_PAD: tl.constexpr, S_PAD: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, HD_PAD)
    row = (b * num_heads + h) * num_splits + s
    lse = tl.load(lse_ptr + row, mask=s < num_splits, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))
    w = tl.where(s < num_splits, w, 0.0)
    part = tl.load(part_ptr + row.to(tl.int64)[:, None] * HD_PAD + d[None, :], mask=(s < num_splits)[:, None],
                   other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < HD)


MAX_SPLITS = 64


@lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16


def _num_splits(batch: int, kv_heads: int, max_ctx: int, block_n: int, device: torch.device) -> int:
    """Enough KV splits for about two waves of programs, none shorter than 2 tiles."""
    want = triton.cdiv(2 * _sm_count(device), batch * kv_heads)
    return max(1, min(want, triton.cdiv(max_ctx, 2 * block_n), MAX_SPLITS))


def decode_attention(q_BHHd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables_BM: torch.Tensor, ctx_lens_B: torch.Tensor, scale: float, max_ctx_len: int,
                     num_splits: int | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """One query token per sequence over its paged context: [B, H, Hd]. ``config`` overrides
    the tile (BLOCK_N keys per iteration, STAGES, num_warps), for tuning."""
    b, h, hd = q_BHHd.shape
    g, bs = k_cache.shape[2], k_cache.shape[1]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and q_BHHd.stride(2) == 1
    out = torch.empty_like(q_BHHd)
    if b == 0:  # an empty micro-batch (an idle replica still steps)
        return out
    cfg = {"BLOCK_N": 64, "STAGES": 3, "num_warps": 4} | (config or {})
    block_n, hd_pad, qh = cfg["BLOCK_N"], triton.next_power_of_2(hd), h // g
    splits = num_splits or _num_splits(b, g, max_ctx_len, block_n, q_BHHd.device)
    assert splits <= MAX_SPLITS
    per_split = triton.cdiv(triton.cdiv(max(max_ctx_len, 1), splits), block_n) * block_n
    part = torch.empty(b * h * splits, hd_pad, dtype=torch.float32, device=q_BHHd.device) if splits > 1 else out
    lse = torch.empty(b * h * splits, dtype=torch.float32, device=q_BHHd.device) if splits > 1 else out
    _decode_kernel[(b, g, splits)](
        q_BHHd, k_cache, v_cache, block_tables_BM, ctx_lens_B, out, part, lse, scale * _LOG2E, per_split, splits,
        q_BHHd.stride(0), q_BHHd.stride(1), block_tables_BM.stride(0), *k_cache.stride()[:3],
        out.stride(0), out.stride(1), QH=qh, QH_PAD=max(16, triton.next_power_of_2(qh)), HD=hd, HD_PAD=hd_pad,
        BS=bs, BLOCK_N=block_n, SPLIT=splits > 1, STAGES=cfg["STAGES"], DOT_PREC=dot_precision(q_BHHd),
        num_warps=cfg["num_warps"])
    if splits > 1:
        _merge_kernel[(b, h)](part, lse, out, h, splits, out.stride(0), out.stride(1), HD=hd, HD_PAD=hd_pad,
                              S_PAD=MAX_SPLITS)
    return out


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, qstart_ptr, qlen_ptr, o_ptr, qk_scale,
                    stride_qt, stride_qh, stride_tb, stride_kb, stride_ks, stride_kg, stride_ot, stride_oh,
                    QH: tl.constexpr, QH_PAD: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr,
                    BS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    b, qb, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_len = tl.load(qlen_ptr + b)
    if qb * BLOCK_Q >= q_len:
        return
    ctx, q0 = tl.load(ctx_ptr + b), tl.load(qstart_ptr + b)
    r = tl.arange(0, BLOCK_Q * QH_PAD)
    tok, hh = qb * BLOCK_Q + r // QH_PAD, r % QH_PAD  # row = (query token, head of the group)
    d = tl.arange(0, HD_PAD)
    rmask, dmask = (tok < q_len) & (hh < QH), d < HD
    q_pos = ctx - q_len + tok  # rows past q_len sit at >= ctx: every key below kv_end is visible
    q_off = (q0 + tok).to(tl.int64)[:, None] * stride_qt + (g * QH + hh)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=rmask[:, None] & dmask[None, :], other=0.0)
    table = table_ptr + b.to(tl.int64) * stride_tb
    kv_end = tl.minimum(ctx, ctx - q_len + (qb + 1) * BLOCK_Q)
    m_i = tl.full([BLOCK_Q * QH_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * QH_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * QH_PAD, HD_PAD], dtype=tl.float32)
    for n0 in tl.range(0, kv_end, BLOCK_N, num_stages=STAGES):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < kv_end
        k = _kv_tile(k_ptr, table, n, nmask, g, d, dmask, stride_kb, stride_ks, stride_kg, BS)
        v = _kv_tile(v_ptr, table, n, nmask, g, d, dmask, stride_kb, stride_ks, stride_kg, BS)
        seen = nmask[None, :] & (n[None, :] <= q_pos[:, None])
        x = tl.where(seen, tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        p = tl.exp2(x - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    o_off = (q0 + tok).to(tl.int64)[:, None] * stride_ot + (g * QH + hh)[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def prefill_attention(q_THHd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta,
                      scale: float) -> torch.Tensor:
    """Causal attention of each sequence's q_len new queries over its ctx_len cached tokens."""
    t, h, hd = q_THHd.shape
    g, bs = k_cache.shape[2], k_cache.shape[1]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and q_THHd.stride(2) == 1
    out = torch.empty_like(q_THHd)
    qh_pad = triton.next_power_of_2(h // g)
    block_q = max(1, 64 // qh_pad)
    grid = (len(meta.q_lens), triton.cdiv(meta.max_q_len, block_q), g)
    if t:
        _prefill_kernel[grid](
            q_THHd, k_cache, v_cache, meta.block_tables_BM, meta.ctx_lens_B, meta.q_starts_B, meta.q_lens_B, out,
            scale * _LOG2E, q_THHd.stride(0), q_THHd.stride(1), meta.block_tables_BM.stride(0),
            *k_cache.stride()[:3], out.stride(0), out.stride(1), QH=h // g, QH_PAD=qh_pad, HD=hd,
            HD_PAD=triton.next_power_of_2(hd), BS=bs, BLOCK_Q=block_q, BLOCK_N=64, STAGES=2,
            DOT_PREC=dot_precision(q_THHd), num_warps=4)
    return out


def paged_attention_gpu(q_THHd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta,
                        scale: float) -> torch.Tensor:
    """``layers.attention.paged_attention`` on the GPU: the decode kernel when every
    sequence has one new token, else the varlen prefill kernel."""
    if meta.block_tables_BM is None:
        add_device_fields(meta, q_THHd.device)
    if meta.decode_only:
        return decode_attention(q_THHd, k_cache, v_cache, meta.block_tables_BM, meta.ctx_lens_B, scale,
                                meta.max_ctx_len)
    return prefill_attention(q_THHd, k_cache, v_cache, meta, scale)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, G, stride_kt, stride_kg, stride_vt, stride_vg,
                     stride_cb, stride_cs, stride_cg, HD: tl.constexpr, BS: tl.constexpr, G_PAD: tl.constexpr,
                     HD_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    gg, d = tl.arange(0, G_PAD), tl.arange(0, HD_PAD)
    mask = (gg < G)[:, None] & (d < HD)[None, :]
    dst = (slot // BS) * stride_cb + (slot % BS) * stride_cs + gg[:, None] * stride_cg + d[None, :]
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + gg[:, None] * stride_kg + d[None, :], mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + gg[:, None] * stride_vg + d[None, :], mask=mask)
    tl.store(kc_ptr + dst, k, mask=mask)
    tl.store(vc_ptr + dst, v, mask=mask)


def write_kv_gpu(k_cache: torch.Tensor, v_cache: torch.Tensor, k_TGHd: torch.Tensor, v_TGHd: torch.Tensor,
                 slot_mapping_T: torch.Tensor) -> None:
    """Store the new tokens' keys and values in one launch; slots < 0 (padding) are skipped."""
    t, g, hd = k_TGHd.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert k_TGHd.stride(2) == 1 and v_TGHd.stride(2) == 1
    if t:
        _write_kv_kernel[(t,)](k_TGHd, v_TGHd, k_cache, v_cache, slot_mapping_T, g, k_TGHd.stride(0),
                               k_TGHd.stride(1), v_TGHd.stride(0), v_TGHd.stride(1), *k_cache.stride()[:3], HD=hd,
                               BS=k_cache.shape[1], G_PAD=triton.next_power_of_2(g),
                               HD_PAD=triton.next_power_of_2(hd))
