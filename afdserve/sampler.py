"""Sampling: penalties and logit bias, greedy, temperature, top-k, top-p, min-p, per-request
seeds, logprobs (of the model's own distribution, before penalties, as vLLM reports them).
Legend: N rows to sample, V vocab."""

from __future__ import annotations

import torch

from afdserve.core import Request, SamplingParams
from afdserve.layers.basic import to_device


def sample(logits_NV: torch.Tensor, requests: list[Request],
           default_generator: torch.Generator | None = None) -> tuple[list[int], list[dict[int, float] | None]]:
    """One new token per row; greedy rows take the argmax (ties: lowest id)."""
    raw_NV = logits_NV.float()
    logits_NV = raw_NV
    adjusted = [i for i, req in enumerate(requests) if req.params.adjusts_logits]
    if adjusted:
        logits_NV = raw_NV.clone()
        for i in adjusted:
            adjust_logits(logits_NV[i], requests[i])
    tokens = torch.argmax(logits_NV, dim=-1).tolist()
    rows = [i for i, req in enumerate(requests) if not req.params.greedy]
    if rows:  # each row draws from its own CPU generator (its seed's, else the engine's)
        probs_RV = probs_batch(logits_NV[rows], [requests[i].params for i in rows]).cpu()
        for i, probs_V in zip(rows, probs_RV):
            gen = requests[i].generator or default_generator
            tokens[i] = int(torch.multinomial(probs_V, 1, generator=gen).item())
    return tokens, _logprobs(raw_NV, tokens, requests)


def can_sample_on_device(req: Request) -> bool:
    """Whether the request's next token can be sampled without the host (async scheduling): no
    logprobs, penalties or logit bias, and no per-request seed (greedy rows need none)."""
    p = req.params
    return p.logprobs is None and not p.adjusts_logits and (p.greedy or req.generator is None)


def sample_on_device(logits_NV: torch.Tensor, requests: list[Request], generator: torch.Generator) -> torch.Tensor:
    """int64 [N] tokens left on the logits' device, no host synchronisation: greedy rows take
    the argmax (ties: lowest id), the others sample from ``probs_batch`` by the exponential race
    (argmax of p / Exp(1) noise picks token i with probability p_i)."""
    logits_NV = logits_NV.float()
    tokens_N = torch.argmax(logits_NV, dim=-1)
    rows = [i for i, req in enumerate(requests) if not req.params.greedy]
    if rows:
        rows_R = to_device(rows, torch.int64, logits_NV.device)
        probs_RV = probs_batch(logits_NV.index_select(0, rows_R), [requests[i].params for i in rows])
        noise_RV = torch.empty_like(probs_RV).exponential_(generator=generator)
        tokens_N.index_copy_(0, rows_R, (probs_RV / noise_RV).argmax(-1))
    return tokens_N


def probs_batch(logits_RV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's sampling distribution, all rows at once (a fixed number of launches, whatever
    the batch): the temperature, top-k (logits below the k-th largest dropped, ties kept), softmax,
    min-p, then top-p (the smallest prefix of the sorted probabilities reaching top_p), renormalised."""
    v = logits_RV.shape[1]
    column = lambda xs, dtype: to_device(xs, dtype, logits_RV.device)[:, None]  # noqa: E731
    x_RV = logits_RV / column([p.temperature for p in params], torch.float32)
    top_k = [p.top_k if 0 < p.top_k < v else v for p in params]
    if any(k < v for k in top_k):
        kth_R1 = x_RV.sort(dim=-1, descending=True).values.gather(1, column([k - 1 for k in top_k], torch.int64))
        x_RV = x_RV.masked_fill(x_RV < kth_R1, float("-inf"))
    probs_RV = torch.softmax(x_RV, dim=-1)
    if any(p.min_p > 0 for p in params):
        floor_R1 = column([p.min_p for p in params], torch.float32) * probs_RV.max(dim=-1, keepdim=True).values
        probs_RV = probs_RV.masked_fill(probs_RV < floor_R1, 0.0)
    if any(p.top_p < 1.0 for p in params):
        sorted_RV, idx_RV = probs_RV.sort(dim=-1, descending=True)
        top_p_R1 = column([p.top_p if p.top_p < 1.0 else float("inf") for p in params], torch.float32)
        drop_RV = sorted_RV.cumsum(dim=-1) - sorted_RV > top_p_R1
        probs_RV = probs_RV.scatter(1, idx_RV, sorted_RV.masked_fill(drop_RV, 0.0))
    return probs_RV / probs_RV.sum(dim=-1, keepdim=True)


def adjust_logits(logits_V: torch.Tensor, req: Request) -> None:
    """In place, vLLM's order: repetition penalty (prompt and output tokens), then frequency
    and presence penalties (output tokens), then the logit bias."""
    p, dev = req.params, logits_V.device
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.prompt_token_ids) | set(req.output_token_ids)), device=dev)
        vals = logits_V[seen]
        logits_V[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and req.output_token_ids:
        ids, counts = torch.tensor(req.output_token_ids, device=dev).unique(return_counts=True)
        logits_V[ids] -= p.frequency_penalty * counts.float() + p.presence_penalty
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=dev)
        logits_V.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), device=dev))


def _logprobs(logits_NV: torch.Tensor, tokens: list[int],
              requests: list[Request]) -> list[dict[int, float] | None]:
    """Logprobs of the raw model distribution: the sampled token plus the top ``logprobs``."""
    out: list[dict[int, float] | None] = []
    want = [r.params.logprobs for r in requests]
    if all(w is None for w in want):
        return [None] * len(requests)
    lp_NV = torch.log_softmax(logits_NV, dim=-1)
    for i, w in enumerate(want):
        if w is None:
            out.append(None)
            continue
        entry = {tokens[i]: float(lp_NV[i, tokens[i]])}
        if w > 0:
            top = torch.topk(lp_NV[i], w)
            entry |= {int(t): float(v) for t, v in zip(top.indices, top.values)}
        out.append(entry)
    return out
