"""Expert FFN (dispatch, grouped GEMMs, combine) against the plain torch path in float32."""

from __future__ import annotations

import pytest
import torch

from afdserve.layers.moe import expert_ffn
from tests.kernels.gpu_check import REL_TOL, interpreted, poison, rel_err

pytestmark = pytest.mark.gpu

IMPLS = ["triton", "grouped_mm"]


def _inputs(tokens: int, experts: int, top_k: int, d: int, i: int, drop: float, seed: int):
    """Random rows, routing with a fraction ``drop`` of ids set to -1, and stacked weights."""
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(tokens, d, generator=gen)
    ids_TK = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=-1).indices
    ids_TK[torch.rand(tokens, top_k, generator=gen) < drop] = -1
    w_TK = torch.rand(tokens, top_k, generator=gen)
    w13_EFD = torch.randn(experts, 2 * i, d, generator=gen) / d ** 0.5
    w2_EDI = torch.randn(experts, d, i, generator=gen) / i ** 0.5
    return x_TD, ids_TK, w_TK, w13_EFD, w2_EDI


def _check(dev, impl: str, tokens: int, experts: int, top_k: int, d: int, i: int, drop: float, seed: int) -> None:
    from afdserve.kernels.experts import fused_experts
    device, dtype = dev
    if impl == "grouped_mm" and (interpreted() or dtype != torch.bfloat16):
        pytest.skip("torch._grouped_mm runs bf16 on CUDA")
    x_TD, ids_TK, w_TK, w13_EFD, w2_EDI = _inputs(tokens, experts, top_k, d, i, drop, seed)
    on = lambda t, cast=True: t.to(device, dtype if cast else t.dtype)  # noqa: E731
    x, w13, w2 = on(x_TD), on(w13_EFD), on(w2_EDI)
    ref_TD = expert_ffn(x.cpu().float(), ids_TK, w_TK, w13.cpu().float(), w2.cpu().float())
    poison(device)
    out_TD = fused_experts(x, on(ids_TK, False), on(w_TK, False), w13, w2, impl=impl)
    assert out_TD.shape == x.shape and out_TD.dtype == dtype
    if ref_TD.abs().max() == 0:  # every id dropped: exact zeros
        assert torch.equal(out_TD.cpu().float(), ref_TD)
    else:
        assert rel_err(out_TD, ref_TD) < REL_TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens,experts,top_k,drop", [
    (1, 8, 2, 0.0),  # a single token: most experts get zero rows
    (1, 128, 8, 0.0),
    (5, 8, 2, 0.5),  # ids = -1: the expert worker's rows held elsewhere
    (64, 128, 8, 0.3),
    (300, 16, 4, 0.0),
])
def test_fused_experts_matches_plain(dev, impl, tokens, experts, top_k, drop):
    for seed in range(2):  # fresh inputs each check
        _check(dev, impl, tokens, experts, top_k, 256, 128, drop, seed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("experts,top_k", [(8, 2), (128, 8)])
def test_fused_experts_4096_tokens(dev, impl, experts, top_k):
    if interpreted():
        pytest.skip("too slow in Triton's interpreter")
    _check(dev, impl, 4096, experts, top_k, 512, 256, 0.1, seed=3)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ids_dropped_gives_zeros(dev, impl):
    _check(dev, impl, 9, 8, 2, 64, 32, drop=1.0, seed=0)


def test_dispatch_rows_places_every_pair(dev):
    """Rows are sorted by expert, each (token, k) held here gets one distinct row."""
    from afdserve.kernels.dispatch import dispatch_rows
    device, _ = dev
    # one chunk (one launch): (1, 8, 2), (8, 128, 8), (50, 8, 2); several: (1000, 128, 8), (77, 60, 4)
    for tokens, experts, top_k in [(1, 8, 2), (8, 128, 8), (50, 8, 2), (1000, 128, 8), (77, 60, 4)]:
        _, ids_TK, _, _, _ = _inputs(tokens, experts, top_k, 8, 8, 0.25, seed=tokens)
        poison(device)
        disp = dispatch_rows(ids_TK.to(device), experts)
        pos, held = disp.pos_TK.cpu().long(), ids_TK >= 0
        counts = torch.bincount(ids_TK[held], minlength=experts)
        assert torch.equal(disp.counts_E.cpu().long(), counts)
        assert torch.equal(disp.ends_E.cpu().long(), counts.cumsum(0))
        assert torch.equal(pos < 0, ~held)
        rows = pos[held]
        assert rows.unique().numel() == rows.numel() == int(counts.sum())
        assert torch.equal(torch.searchsorted(disp.ends_E.cpu().long(), rows, right=True), ids_TK[held])
        token_of_pair = torch.arange(tokens)[:, None].expand(tokens, top_k)[held]
        assert torch.equal(disp.src_N.cpu().long()[rows], token_of_pair)


def test_expert_ffn_dispatches_to_gpu(dev):
    device, dtype = dev
    x_TD, ids_TK, w_TK, w13_EFD, w2_EDI = _inputs(40, 8, 2, 128, 64, 0.2, seed=5)
    on = lambda t: t.to(device, dtype)  # noqa: E731
    out_TD = expert_ffn(on(x_TD), ids_TK.to(device), w_TK.to(device), on(w13_EFD), on(w2_EDI))
    ref_TD = expert_ffn(on(x_TD).cpu().float(), ids_TK, w_TK, on(w13_EFD).cpu().float(), on(w2_EDI).cpu().float())
    assert out_TD.device.type == device and rel_err(out_TD, ref_TD) < REL_TOL


def test_float32_runs_in_full_precision(dev):
    """float32 operands take the "ieee" dot (not tf32): close to the float32 plain path."""
    from afdserve.kernels.experts import fused_experts
    device, _ = dev
    x_TD, ids_TK, w_TK, w13_EFD, w2_EDI = _inputs(70, 16, 4, 128, 64, 0.2, seed=9)
    out_TD = fused_experts(x_TD.to(device), ids_TK.to(device), w_TK.to(device), w13_EFD.to(device),
                           w2_EDI.to(device))
    assert rel_err(out_TD, expert_ffn(x_TD, ids_TK, w_TK, w13_EFD, w2_EDI)) < 1e-5
