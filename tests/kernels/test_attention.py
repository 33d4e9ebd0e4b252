"""Paged decode / varlen prefill attention and KV writes against the plain torch path.
Legend: B sequences, T tokens, H query heads, G kv heads, Hd head dim, NB blocks, BS block size."""

from __future__ import annotations

import pytest
import torch

from afdserve.layers.attention import AttnMeta, add_device_fields, paged_attention, write_kv
from tests.kernels.gpu_check import REL_TOL, poison, rel_err

pytestmark = pytest.mark.gpu

BS = 16


def _batch(q_lens: list[int], ctx_lens: list[int], heads: int, kv_heads: int, hd: int, seed: int, device: str,
           dtype: torch.dtype):
    """Random q, caches and metadata; every sequence's blocks are scattered over the cache."""
    gen = torch.Generator().manual_seed(seed)
    need = [(c + BS - 1) // BS + 1 for c in ctx_lens]  # one spare block each, like a real table
    perm = torch.randperm(sum(need) + 3, generator=gen).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n])
        at += n
    caches = [torch.randn(len(perm), BS, kv_heads, hd, generator=gen).to(device, dtype) for _ in range(2)]
    q_THHd = torch.randn(sum(q_lens), heads, hd, generator=gen).to(device, dtype)
    meta = AttnMeta(torch.zeros(sum(q_lens), dtype=torch.int64), torch.zeros(sum(q_lens), dtype=torch.int64),
                    list(q_lens), list(ctx_lens), tables)
    return q_THHd, caches, meta


def _reference(q_THHd, caches, meta: AttnMeta, scale: float) -> torch.Tensor:
    cpu = AttnMeta(meta.positions_T, meta.slot_mapping_T, meta.q_lens, meta.ctx_lens, meta.block_tables)
    return paged_attention(q_THHd.cpu().float(), caches[0].cpu().float(), caches[1].cpu().float(), cpu, scale)


@pytest.mark.parametrize("heads,kv_heads,hd", [(32, 8, 128), (32, 4, 128), (28, 4, 64), (4, 2, 16)])
@pytest.mark.parametrize("ctx_lens", [[1], [16, 17, 300, 2000, 5, 64, 1024], [257] * 40])
def test_decode_matches_plain(dev, heads, kv_heads, hd, ctx_lens):
    from afdserve.kernels.attention import decode_attention
    device, dtype = dev
    for seed, splits in [(0, None), (1, 1), (2, 3)]:  # fresh inputs; auto, one and three KV splits
        q, caches, meta = _batch([1] * len(ctx_lens), ctx_lens, heads, kv_heads, hd, seed, device, dtype)
        add_device_fields(meta, device)
        assert meta.decode_only
        poison(device)
        out = decode_attention(q, caches[0], caches[1], meta.block_tables_BM, meta.ctx_lens_B, hd ** -0.5,
                               meta.max_ctx_len, num_splits=splits or (None if device == "cuda" else 2))
        assert rel_err(out, _reference(q, caches, meta, hd ** -0.5)) < REL_TOL


@pytest.mark.parametrize("heads,kv_heads,hd", [(32, 8, 128), (32, 4, 128), (4, 2, 16)])
@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([5], [5]),  # a fresh prompt
    ([1, 17, 64, 130], [1, 17, 100, 400]),  # decodes beside chunked prefills with earlier context
    ([300, 1, 2], [300, 900, 33]),
])
def test_prefill_matches_plain(dev, heads, kv_heads, hd, q_lens, ctx_lens):
    from afdserve.kernels.attention import paged_attention_gpu
    device, dtype = dev
    for seed in range(2):
        q, caches, meta = _batch(q_lens, ctx_lens, heads, kv_heads, hd, seed, device, dtype)
        poison(device)
        out = paged_attention_gpu(q, caches[0], caches[1], meta, hd ** -0.5)  # fills the device fields itself
        assert not meta.decode_only or q_lens == [1] * len(q_lens)
        assert rel_err(out, _reference(q, caches, meta, hd ** -0.5)) < REL_TOL


def test_paged_attention_dispatches_to_gpu(dev):
    device, dtype = dev
    q, caches, meta = _batch([1, 1, 3], [40, 7, 3], 8, 2, 64, 4, device, dtype)
    out = paged_attention(q, caches[0], caches[1], meta, 0.125)
    assert out.device.type == device and rel_err(out, _reference(q, caches, meta, 0.125)) < REL_TOL


def test_write_kv_matches_plain(dev):
    """Keys and values land in their slots, a slot < 0 writes nothing, other slots keep their data."""
    from afdserve.kernels.attention import write_kv_gpu
    device, dtype = dev
    gen = torch.Generator().manual_seed(0)
    for t, g, hd in [(1, 8, 128), (300, 4, 128), (37, 2, 16)]:
        caches = [torch.randn(64, BS, g, hd, generator=gen).to(device, dtype) for _ in range(2)]
        k, v = (torch.randn(t, g, hd, generator=gen).to(device, dtype) for _ in range(2))
        slots = torch.randperm(64 * BS, generator=gen)[:t]
        slots[1::7] = -1  # padding rows
        held = slots >= 0
        want = [c.cpu().clone() for c in caches]
        write_kv(want[0], want[1], k.cpu()[held], v.cpu()[held], slots[held])  # the plain path, real rows only
        write_kv_gpu(caches[0], caches[1], k, v, slots.to(device))
        for got, ref in zip(caches, want):
            assert torch.equal(got.cpu(), ref)


def test_float32_runs_in_full_precision(dev):
    """float32 operands take the "ieee" dot (not tf32) in both attention kernels."""
    device, _ = dev
    for q_lens, ctx_lens in [([1, 1, 1], [40, 300, 7]), ([9, 1], [30, 77])]:
        q, caches, meta = _batch(q_lens, ctx_lens, 8, 2, 64, 5, device, torch.float32)
        from afdserve.kernels.attention import paged_attention_gpu
        out = paged_attention_gpu(q, caches[0], caches[1], meta, 0.125)
        assert rel_err(out, _reference(q, caches, meta, 0.125)) < 1e-5
