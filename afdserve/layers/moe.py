"""Router and expert FFN, plain torch (the CPU path and the reference for fused GPU kernels).
Legend: T tokens, D hidden, E experts, K top-k, F = 2*I fused gate+up, I intermediate."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(x_TD: torch.Tensor, gate_ED: torch.Tensor, top_k: int, renormalize: bool,
          bias_E: torch.Tensor | None = None, num_valid_1: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router: returns (topk_ids_TK int64, topk_w_TK float32). ``bias_E`` is added
    to the logits (the router-skew knob of tests and benchmarks). Rows from ``num_valid_1``
    (a one-element device tensor: CUDA-graph padding) on choose no expert (id -1, weight 0)."""
    if x_TD.is_cuda and bias_E is None:
        from afdserve.kernels.router import route_gpu  # Triton: imported only on GPU
        return route_gpu(x_TD, gate_ED, top_k, renormalize, num_valid_1)
    logits_TE = F.linear(x_TD, gate_ED)
    if bias_E is not None:
        logits_TE = logits_TE + bias_E.to(logits_TE)
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    topk_w_TK, topk_ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        topk_w_TK = topk_w_TK / topk_w_TK.sum(dim=-1, keepdim=True)
    if num_valid_1 is not None:
        routed_T1 = (torch.arange(x_TD.shape[0], device=x_TD.device) < num_valid_1)[:, None]
        topk_ids_TK = torch.where(routed_T1, topk_ids_TK, -1)
        topk_w_TK = torch.where(routed_T1, topk_w_TK, 0.0)
    return topk_ids_TK, topk_w_TK


def expert_ffn(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_w_TK: torch.Tensor,
               w13_EFD: torch.Tensor, w2_EDI: torch.Tensor) -> torch.Tensor:
    """Sum over each token's chosen experts of w_k * down(silu(gate(x)) * up(x)).

    ``topk_ids_TK`` index the local experts in ``w13_EFD``/``w2_EDI``; an id < 0 means
    "not held here" and contributes nothing. Experts run in ascending id order.
    """
    if x_TD.is_cuda:
        from afdserve.kernels.experts import fused_experts  # Triton / grouped GEMM: imported only on GPU
        return fused_experts(x_TD, topk_ids_TK, topk_w_TK, w13_EFD, w2_EDI)
    y_TD = torch.zeros_like(x_TD)
    for e in torch.unique(topk_ids_TK[topk_ids_TK >= 0]).tolist():
        tok_N, k_N = torch.where(topk_ids_TK == e)
        gate_NI, up_NI = F.linear(x_TD[tok_N], w13_EFD[e]).chunk(2, dim=-1)
        out_ND = F.linear(F.silu(gate_NI) * up_NI, w2_EDI[e])
        out_ND = out_ND * topk_w_TK[tok_N, k_N, None].to(out_ND.dtype)
        y_TD.index_add_(0, tok_N, out_ND.to(y_TD.dtype))
    return y_TD


def dense_mlp(x_TD: torch.Tensor, w13_FD: torch.Tensor, w2_DI: torch.Tensor) -> torch.Tensor:
    """A gated SiLU MLP (Qwen2-MoE's shared expert)."""
    gate_TI, up_TI = F.linear(x_TD, w13_FD).chunk(2, dim=-1)
    return F.linear(F.silu(gate_TI) * up_TI, w2_DI)
