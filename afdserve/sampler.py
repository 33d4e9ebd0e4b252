"""Sampling: penalties and logit bias, greedy, temperature, top-k, top-p, min-p, per-request
seeds, logprobs (of the model's own distribution, before penalties, as vLLM reports them).
Legend: N rows to sample, V vocab."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afdserve.core import Request, SamplingParams
from afdserve.layers.basic import to_device


def sample(logits_NV: torch.Tensor, requests: list[Request], generator: torch.Generator | None = None,
           penalties: PenaltyTable | None = None) -> tuple[list[int], list[dict[int, float] | None]]:
    """``sample_on_device``, read on the host: one new token per row and each row's logprobs
    (None where not asked for). Without ``penalties`` the penalised rows count whole histories."""
    if penalties is None and any(req.params.penalizes for req in requests):
        penalties = PenaltyTable(logits_NV.shape[1], logits_NV.device)
    chosen = sample_on_device(logits_NV, requests, generator, penalties)
    host = [t.cpu() for t in chosen.tensors()]
    return host[0].tolist(), chosen.logprob_entries(host)


@dataclass
class DeviceSample:
    """What ``sample_on_device`` leaves on the device: the tokens, and for the rows that asked
    for logprobs (``lp_rows``, with ``lp_want`` top entries each) the sampled token's logprob
    and the top ``max(lp_want)`` logprobs and their ids."""

    tokens_N: torch.Tensor  # int64
    lp_rows: list[int] = field(default_factory=list)
    lp_want: list[int] = field(default_factory=list)
    token_lp_R: torch.Tensor | None = None  # float32 [R]
    top_lp_RW: torch.Tensor | None = None  # float32 [R, W]
    top_ids_RW: torch.Tensor | None = None  # int64 [R, W]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.tokens_N, self.token_lp_R, self.top_lp_RW, self.top_ids_RW) if t is not None]

    def logprob_entries(self, host: list[torch.Tensor]) -> list[dict[int, float] | None]:
        """Per row, from ``host`` (``tensors()`` as read on the host): {token: logprob} plus the
        top entries, None where no logprobs were asked for."""
        tokens = host[0].tolist()
        out: list[dict[int, float] | None] = [None] * len(tokens)
        if not self.lp_rows:
            return out
        token_lp, top_lp, top_ids = (t.tolist() for t in host[1:])
        for r, (i, w) in enumerate(zip(self.lp_rows, self.lp_want)):
            out[i] = {tokens[i]: token_lp[r]} | {t: v for t, v in zip(top_ids[r][:w], top_lp[r][:w])}
        return out


def with_logprobs(raw_NV: torch.Tensor, tokens_N: torch.Tensor, requests: list[Request]) -> DeviceSample:
    """The chosen tokens and, for the rows that ask, logprobs of the raw model distribution
    (the chosen token's and the top ones), all on the logits' device."""
    out = DeviceSample(tokens_N)
    want = [(i, req.params.logprobs) for i, req in enumerate(requests) if req.params.logprobs is not None]
    if want:
        out.lp_rows, out.lp_want = [i for i, _ in want], [w for _, w in want]
        rows_R = to_device(out.lp_rows, torch.int64, raw_NV.device)
        lp_RV = torch.log_softmax(raw_NV.index_select(0, rows_R), dim=-1)
        out.token_lp_R = lp_RV.gather(1, tokens_N.index_select(0, rows_R)[:, None])[:, 0]
        out.top_lp_RW, out.top_ids_RW = lp_RV.topk(max(max(out.lp_want), 1), dim=-1)
    return out


def sample_on_device(logits_NV: torch.Tensor, requests: list[Request], generator: torch.Generator | None = None,
                     penalties: PenaltyTable | None = None) -> DeviceSample:
    """Tokens left on the logits' device, no host synchronisation: penalties (output counts from
    ``penalties``, which the tokens sampled here join) and logit bias as ``adjust_batch`` applies
    them, greedy rows take the argmax (ties: lowest id), the others sample from ``probs_batch``
    by the exponential race (argmax of p / Exp(1) noise picks token i with probability p_i), the
    noise from the request's seeded generator (on this device) or else from ``generator`` (None:
    torch's default one);
    logprobs of the raw model distribution for the rows that ask."""
    raw_NV = logits_NV.float()
    dev = raw_NV.device
    penalised = [i for i, req in enumerate(requests) if req.params.penalizes]
    if penalised and penalties is None:
        raise ValueError("penalised requests need a PenaltyTable to sample on the device")
    logits_NV = adjust_batch(raw_NV, requests, penalties.gather if penalised else None)
    tokens_N = torch.argmax(logits_NV, dim=-1)
    rows = [i for i, req in enumerate(requests) if not req.params.greedy]
    if rows:
        rows_R = to_device(rows, torch.int64, dev)
        probs_RV = probs_batch(logits_NV.index_select(0, rows_R), [requests[i].params for i in rows])
        noise_RV = torch.empty_like(probs_RV).exponential_(generator=generator)
        for r, i in enumerate(rows):  # a seed's draws come from its own generator: batch-independent
            if requests[i].generator is not None:
                noise_RV[r].exponential_(generator=requests[i].generator)
        tokens_N.index_copy_(0, rows_R, (probs_RV / noise_RV).argmax(-1))
    if penalised:
        chosen_R = tokens_N.index_select(0, to_device(penalised, torch.int64, dev))
        penalties.add([requests[i] for i in penalised], chosen_R)
    return with_logprobs(raw_NV, tokens_N, requests)


def adjust_batch(raw_NV: torch.Tensor, requests: list[Request], output_counts) -> torch.Tensor:
    """The logits with every row's penalties and logit bias applied (a copy; the raw ones when
    nothing applies), all rows in a fixed number of launches, in vLLM's order: repetition penalty
    (prompt and output tokens), frequency and presence penalties (output tokens), logit bias, then
    allowed_token_ids (all other tokens of the row to -inf).
    tests/test_sampler.py keeps a one-row reference. ``output_counts(reqs)`` (``PenaltyTable.gather``):
    float32 [R, V] output token counts and bool [R, V] prompt tokens of the penalised requests."""
    rows = [i for i, req in enumerate(requests) if req.params.penalizes]
    biased = [(i, t, b) for i, req in enumerate(requests) for t, b in req.params.logit_bias.items()]
    allowed = [(i, t) for i, req in enumerate(requests) for t in req.params.allowed_token_ids or []]
    if not rows and not biased and not allowed:
        return raw_NV
    dev, out_NV = raw_NV.device, raw_NV.clone()
    if rows:
        reqs = [requests[i] for i in rows]
        counts_RV, prompt_RV = output_counts(reqs)
        column = lambda xs: to_device(xs, torch.float32, dev)[:, None]  # noqa: E731
        rep_R1 = column([req.params.repetition_penalty for req in reqs])
        rows_R = to_device(rows, torch.int64, dev)
        x_RV = out_NV.index_select(0, rows_R)
        used_RV = counts_RV > 0
        x_RV = torch.where(prompt_RV | used_RV, torch.where(x_RV > 0, x_RV / rep_R1, x_RV * rep_R1), x_RV)
        x_RV -= (column([req.params.frequency_penalty for req in reqs]) * counts_RV
                 + column([req.params.presence_penalty for req in reqs]) * used_RV)
        out_NV.index_copy_(0, rows_R, x_RV)
    if biased:
        rows_B, ids_B = (to_device([x[j] for x in biased], torch.int64, dev) for j in (0, 1))
        out_NV.index_put_((rows_B, ids_B), to_device([x[2] for x in biased], torch.float32, dev), accumulate=True)
    finite(out_NV)
    if allowed:  # vLLM's allowed_token_ids: every other token of those rows is masked out
        keep_NV = torch.ones_like(out_NV, dtype=torch.bool)
        keep_NV.index_fill_(0, to_device(sorted({i for i, _ in allowed}), torch.int64, dev), False)
        _mark(keep_NV, allowed, count=False)
        out_NV.masked_fill_(~keep_NV, float("-inf"))
    return out_NV


_F32_MAX = torch.finfo(torch.float32).max


def finite(x: torch.Tensor) -> torch.Tensor:
    """In place: +inf (a logit divided by a tiny penalty or temperature) becomes the largest
    float32, NaN and -inf the lowest (chosen only from a row with nothing else), so every row
    keeps a finite maximum and sampling never sees a non-finite distribution. Masks applied
    afterwards (allowed tokens, top-k) still use -inf."""
    return x.nan_to_num_(nan=-_F32_MAX, posinf=_F32_MAX, neginf=-_F32_MAX)


def _mark(dst_RV: torch.Tensor, pairs: list[tuple[int, int]], count: bool) -> None:
    """dst[row, token] += 1 for each (row, token) pair (``count``), else set to 1 / True."""
    if pairs:
        at = tuple(to_device([x[j] for x in pairs], torch.int64, dst_RV.device) for j in (0, 1))
        dst_RV.index_put_(at, torch.ones(len(pairs), dtype=dst_RV.dtype, device=dst_RV.device), accumulate=count)


class PenaltyTable:
    """Output token counts and prompt tokens of the penalised requests, one row each, kept on
    the logits' device: a request's prompt and the tokens the host knows are added once (the
    host sampler's tokens at the next step), each token sampled on the device is added there as
    it is sampled (async scheduling: the one still in flight is counted too), so a step reads
    no whole history. Rows of finished requests are
    reused. Memory: 5 bytes x vocab per row."""

    def __init__(self, vocab: int, device: torch.device | str):
        self.vocab, self.device = vocab, torch.device(device)
        self.counts_SV = torch.zeros(0, vocab, dtype=torch.float32, device=self.device)
        self.prompt_SV = torch.zeros(0, vocab, dtype=torch.bool, device=self.device)
        self.rows: dict[int, tuple[int, Request]] = {}  # id(request) -> (row, request)
        self.counted: dict[int, int] = {}  # id(request) -> output tokens counted (a prefix)

    def gather(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts [R, V] and prompt tokens [R, V] of ``reqs``, after adding what the host knows
        and the table does not (a request's first use, tokens sampled on the host)."""
        rows, catch_up = [], []
        for req in reqs:
            row = self._row(req)
            known = req.output_token_ids[self.counted[id(req)]:]
            catch_up += [(row, t) for t in known]
            self.counted[id(req)] += len(known)
            rows.append(row)
        _mark(self.counts_SV, catch_up, count=True)
        rows_R = to_device(rows, torch.int64, self.device)
        return self.counts_SV.index_select(0, rows_R), self.prompt_SV.index_select(0, rows_R)

    def add(self, reqs: list[Request], tokens_R: torch.Tensor) -> None:
        """Count each request's newly sampled token (on the device, no host sync)."""
        rows_R = to_device([self.rows[id(req)][0] for req in reqs], torch.int64, self.device)
        ones_R = torch.ones(len(reqs), dtype=torch.float32, device=self.device)
        self.counts_SV.index_put_((rows_R, tokens_R), ones_R, accumulate=True)
        for req in reqs:
            self.counted[id(req)] += 1

    def _row(self, req: Request) -> int:
        if id(req) in self.rows and self.rows[id(req)][1] is req:
            return self.rows[id(req)][0]
        taken = {row for key, (row, r) in list(self.rows.items()) if not self._drop_if_done(key, r)}
        row = min(set(range(self.counts_SV.shape[0])) - taken, default=None)
        if row is None:
            row = self._grow()
        self.rows[id(req)], self.counted[id(req)] = (row, req), 0
        self.counts_SV[row].zero_()
        self.prompt_SV[row].zero_()
        _mark(self.prompt_SV, [(row, t) for t in req.prompt_token_ids], count=False)
        return row

    def _drop_if_done(self, key: int, req: Request) -> bool:
        if req.finished:
            del self.rows[key], self.counted[key]
        return req.finished

    def _grow(self) -> int:
        n = self.counts_SV.shape[0]
        grown = max(16, 2 * n)
        self.counts_SV = torch.cat([self.counts_SV, self.counts_SV.new_zeros(grown - n, self.vocab)])
        self.prompt_SV = torch.cat([self.prompt_SV, self.prompt_SV.new_zeros(grown - n, self.vocab)])
        return n


def probs_batch(logits_RV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's sampling distribution, all rows at once (a fixed number of launches, whatever
    the batch): the temperature, top-k (logits below the k-th largest dropped, ties kept), softmax,
    min-p, then top-p (the smallest prefix of the sorted probabilities reaching top_p), renormalised."""
    v = logits_RV.shape[1]
    column = lambda xs, dtype: to_device(xs, dtype, logits_RV.device)[:, None]  # noqa: E731
    x_RV = finite(logits_RV / column([p.temperature for p in params], torch.float32))
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
