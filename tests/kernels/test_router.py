"""Fused router (softmax + top-k + renormalise + counts) against the plain torch math."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.gpu_check import poison

pytestmark = pytest.mark.gpu


def _reference(logits_TE: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of ``layers.moe.route`` after the gate GEMM: (probs_TE, sorted top-k weights)."""
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    w_TK = torch.topk(probs_TE, top_k, dim=-1).values
    if renormalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    return probs_TE, w_TK


@pytest.mark.parametrize("tokens,experts,top_k,renorm", [
    (1, 8, 2, True), (7, 8, 2, False), (33, 60, 4, False), (257, 128, 8, True), (4096, 128, 8, True)])
def test_fused_topk_matches_torch(dev, tokens, experts, top_k, renorm):
    from afdserve.kernels.router import fused_topk
    device, dtype = dev
    for seed in range(2):  # fresh inputs each check
        gen = torch.Generator().manual_seed(seed)
        logits_TE = (torch.randn(tokens, experts, generator=gen) * 2).to(dtype).to(device)
        poison(device)
        ids_TK, w_TK, counts_E = fused_topk(logits_TE, top_k, renorm)
        probs_TE, ref_w_TK = _reference(logits_TE, top_k, renorm)
        ids = ids_TK.cpu()
        assert ids.dtype == torch.int64 and ((ids >= 0) & (ids < experts)).all()
        assert all(len(set(row)) == top_k for row in ids.tolist()), "an expert chosen twice"
        # ties between equal probabilities may pick either id: compare the chosen probabilities
        chosen_TK = probs_TE.cpu().gather(1, ids)
        if renorm:
            chosen_TK = chosen_TK / chosen_TK.sum(-1, keepdim=True)
        torch.testing.assert_close(chosen_TK, ref_w_TK.cpu(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w_TK.cpu(), ref_w_TK.cpu(), rtol=1e-5, atol=1e-7)
        assert torch.equal(counts_E.cpu().long(), torch.bincount(ids.flatten(), minlength=experts))


def test_route_dispatches_to_gpu(dev):
    """``layers.moe.route`` on device tensors gives the plain result (weights equal)."""
    from afdserve.layers.moe import route
    device, dtype = dev
    x_TD = torch.randn(64, 256).to(dtype).to(device)
    gate_ED = (torch.randn(16, 256) / 16).to(dtype).to(device)
    ids_TK, w_TK = route(x_TD, gate_ED, 4, True)
    _, ref_w_TK = _reference(torch.nn.functional.linear(x_TD, gate_ED), 4, True)
    torch.testing.assert_close(w_TK, ref_w_TK, rtol=1e-5, atol=1e-7)
    assert ids_TK.shape == (64, 4) and ids_TK.device.type == device


@pytest.mark.parametrize("tokens,valid", [(16, 10), (16, 0), (8, 8), (70, 65)])
def test_padding_rows_choose_no_expert(dev, tokens, valid):
    """Rows past the device-side count (CUDA-graph padding) get id -1 and weight 0, kernel and
    plain path alike; the valid rows and the counts are those of the valid rows alone."""
    from afdserve.kernels.router import fused_topk
    from afdserve.layers.moe import route
    device, dtype = dev
    gen = torch.Generator().manual_seed(tokens + valid)
    logits_TE = (torch.randn(tokens, 128, generator=gen) * 2).to(dtype).to(device)
    num_valid_1 = torch.tensor([valid], dtype=torch.int32, device=device)
    poison(device)
    ids_TK, w_TK, counts_E = fused_topk(logits_TE, 8, True, num_valid_1=num_valid_1)
    full_ids, full_w, _ = fused_topk(logits_TE, 8, True)
    assert (ids_TK[valid:] == -1).all() and (w_TK[valid:] == 0).all()
    assert torch.equal(ids_TK[:valid], full_ids[:valid]) and torch.equal(w_TK[:valid], full_w[:valid])
    assert torch.equal(counts_E.cpu().long(), torch.bincount(full_ids[:valid].flatten().cpu(), minlength=128))
    x_TD = torch.randn(tokens, 64, generator=gen)
    gate_ED = torch.randn(128, 64, generator=gen) / 8
    ids, w = route(x_TD, gate_ED, 8, True, num_valid_1=num_valid_1.cpu())  # the plain path
    ref_ids, ref_w = route(x_TD, gate_ED, 8, True)
    assert (ids[valid:] == -1).all() and (w[valid:] == 0).all()
    assert torch.equal(ids[:valid], ref_ids[:valid]) and torch.equal(w[:valid], ref_w[:valid])
