"""Fused RMSNorm (with and without the residual add) and the fused q/k/v preparation (per-head
norm, RoPE, KV-cache write) against the plain torch path, outputs poisoned before each run.
Legend: T tokens, D hidden, H heads, G kv heads, Hd head dim, BS block size."""

from __future__ import annotations

import pytest
import torch

from afdserve.layers.attention import prepare_qkv
from afdserve.layers.basic import add_rms_norm, rms_norm, rope_cos_sin
from tests.kernels.gpu_check import poison

pytestmark = pytest.mark.gpu

BS = 16


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to one rounding step of the activation dtype (the fused sums run in another order)."""
    got, want = got.cpu().float(), want.float()
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("t,d", [(1, 2048), (37, 4096), (5, 6144), (3, 96)])
def test_rms_norm_matches_plain(dev, t, d):
    from afdserve.kernels.norm import add_rms_norm_gpu, rms_norm_gpu
    device, dtype = dev
    gen = torch.Generator().manual_seed(t)
    x, a = (torch.randn(t, d, generator=gen).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
    poison(device)
    _close(rms_norm_gpu(x.to(device), w.to(device), 1e-6), rms_norm(x, w, 1e-6))
    poison(device)
    y, s = add_rms_norm_gpu(x.to(device), a.to(device), w.to(device), 1e-6)
    y_ref, s_ref = add_rms_norm(x, a, w, 1e-6)
    assert torch.equal(s.cpu(), s_ref)  # the residual sum rounds once, like torch's add
    _close(y, y_ref)


def test_norms_dispatch_to_gpu(dev):
    device, dtype = dev
    x = torch.randn(4, 64).to(device, dtype)
    w = torch.ones(64).to(device, dtype)
    assert rms_norm(x, w, 1e-6).device.type == device and add_rms_norm(x, x, w, 1e-6)[1].device.type == device


@pytest.mark.parametrize("heads,kv_heads,hd,qk_norm", [(32, 4, 128, True), (32, 8, 128, False), (4, 2, 48, True),
                                                       (8, 1, 64, False)])
def test_prepare_qkv_matches_plain(dev, heads, kv_heads, hd, qk_norm):
    """Queries out; keys (normed, rotated) and values in their slots; slots < 0 and every other
    slot keep their old contents."""
    from afdserve.kernels.qkv import prepare_qkv_gpu
    device, dtype = dev
    gen = torch.Generator().manual_seed(hd + heads)
    t, blocks = 23, 8
    qkv = torch.randn(t, (heads + 2 * kv_heads) * hd, generator=gen).to(dtype)
    norms = [(1 + 0.1 * torch.randn(hd, generator=gen)).to(dtype) for _ in range(2)] if qk_norm else [None, None]
    positions = torch.randint(0, 4000, (t,), generator=gen)
    slots = torch.randperm(blocks * BS, generator=gen)[:t]
    slots[2::5] = -1  # padding rows
    caches = [torch.randn(blocks, BS, kv_heads, hd, generator=gen).to(dtype) for _ in range(2)]
    want = [c.clone() for c in caches]
    held = slots >= 0
    rope = rope_cos_sin(positions, hd, 1e6)
    q_ref = prepare_qkv(qkv, heads, kv_heads, *norms, 1e-6, rope, *[c.clone() for c in caches], slots.clamp(0))
    prepare_qkv(qkv[held], heads, kv_heads, *norms, 1e-6, [r[held] for r in rope], *want, slots[held])  # real rows
    on = [c.to(device) for c in caches]
    poison(device)
    q = prepare_qkv_gpu(qkv.to(device), heads, kv_heads, *[n if n is None else n.to(device) for n in norms], 1e-6,
                        *[r.to(device) for r in rope], *on, slots.to(device))
    _close(q, q_ref)
    for got, ref, old in zip(on, want, caches):
        _close(got.flatten(0, 1)[slots[held]], ref.flatten(0, 1)[slots[held]])
        untouched = torch.ones(blocks * BS, dtype=torch.bool)
        untouched[slots[held]] = False
        assert torch.equal(got.cpu().flatten(0, 1)[untouched], old.flatten(0, 1)[untouched])
