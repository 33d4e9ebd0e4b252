"""From the fused q/k/v projection to attention's inputs in one launch (same function as
``afdserve.layers.attention.prepare_qkv``): per-head RMSNorm of q and k (Qwen3), rotary
embedding of q and k, keys and values stored in their KV-cache slots, queries returned.
Legend: T tokens, H query heads, G kv heads, Hd head dim, F = (H + 2G) * Hd, BS block size.

Program (t, j) handles head j of token t: j < H a query head, H <= j < H + G a key head,
the rest value heads. The rotate-half partner of every element is loaded again from memory
(cheaper than permuting registers). Roundings follow the plain path: the norm's result, each
RoPE product and their sum are rounded to the activation dtype, like torch's bf16 ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm(x, x_p, w_ptr, d, d_p, dmask, eps, HD: tl.constexpr, DT: tl.constexpr):
    """RMSNorm of one head's vector and of its rotate-half partner (same scale)."""
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / HD + eps)
    w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    w_p = tl.load(w_ptr + d_p, mask=dmask, other=0.0).to(tl.float32)
    x = (w * (x * inv).to(DT).to(tl.float32)).to(DT).to(tl.float32)
    x_p = (w_p * (x_p * inv).to(DT).to(tl.float32)).to(DT).to(tl.float32)
    return x, x_p


@triton.jit
def _qkv_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr,
                H, G, stride_t, stride_rope, stride_cb, stride_cs, stride_cg, eps,
                HD: tl.constexpr, HD_PAD: tl.constexpr, BS: tl.constexpr, NORM: tl.constexpr):
    t, j = tl.program_id(0).to(tl.int64), tl.program_id(1)
    DT: tl.constexpr = q_ptr.dtype.element_ty
    d = tl.arange(0, HD_PAD)
    dmask = d < HD
    src = qkv_ptr + t * stride_t + j * HD
    x = tl.load(src + d, mask=dmask, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + t)
    cache_row = (slot // BS) * stride_cb + (slot % BS) * stride_cs
    if j >= H + G:  # a value head: straight into the cache
        if slot >= 0:
            tl.store(vc_ptr + cache_row + (j - H - G) * stride_cg + d, x.to(DT), mask=dmask)
        return
    d_p = (d + HD // 2) % HD
    x_p = tl.load(src + d_p, mask=dmask, other=0.0).to(tl.float32)
    if NORM:
        if j < H:
            x, x_p = _norm(x, x_p, qn_ptr, d, d_p, dmask, eps, HD, DT)
        else:
            x, x_p = _norm(x, x_p, kn_ptr, d, d_p, dmask, eps, HD, DT)
    cos = tl.load(cos_ptr + t * stride_rope + d, mask=dmask, other=0.0).to(DT).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_rope + d, mask=dmask, other=0.0).to(DT).to(tl.float32)
    rot = tl.where(d < HD // 2, -x_p, x_p)
    out = ((x * cos).to(DT).to(tl.float32) + (rot * sin).to(DT).to(tl.float32)).to(DT)
    if j < H:
        tl.store(q_ptr + t * H * HD + j * HD + d, out, mask=dmask)
    elif slot >= 0:
        tl.store(kc_ptr + cache_row + (j - H) * stride_cg + d, out, mask=dmask)


def prepare_qkv_gpu(qkv_TF: torch.Tensor, heads: int, kv_heads: int, q_norm: torch.Tensor | None,
                    k_norm: torch.Tensor | None, eps: float, cos_THd: torch.Tensor, sin_THd: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping_T: torch.Tensor) -> torch.Tensor:
    """Queries [T, H, Hd] after norm and RoPE; keys (normed, rotated) and values written to the
    caches [NB, BS, G, Hd] at their slots (slots < 0 skipped)."""
    t = qkv_TF.shape[0]
    hd = k_cache.shape[3]
    assert qkv_TF.shape[1] == (heads + 2 * kv_heads) * hd and qkv_TF.stride(1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and cos_THd.stride() == sin_THd.stride()
    q_THHd = torch.empty(t, heads, hd, dtype=qkv_TF.dtype, device=qkv_TF.device)
    if t:
        norm = q_norm is not None
        _qkv_kernel[(t, heads + 2 * kv_heads)](
            qkv_TF, q_norm if norm else qkv_TF, k_norm if norm else qkv_TF, cos_THd, sin_THd, q_THHd, k_cache,
            v_cache, slot_mapping_T, heads, kv_heads, qkv_TF.stride(0), cos_THd.stride(0), *k_cache.stride()[:3], eps,
            HD=hd, HD_PAD=triton.next_power_of_2(hd), BS=k_cache.shape[1], NORM=norm, num_warps=1)
    return q_THHd
