"""One attention replica's engine: ``schedule -> run -> update``.

The engine owns the requests, the scheduler and the sampler; an executor runs the layers
(in-process experts, or the ping-pong pipeline to remote expert groups).

With async scheduling (vLLM's ``--async-scheduling``, SGLang's overlap scheduler) a step is
launched before the host has read the tokens of the one before: those stay on the GPU, are
counted as pending by the scheduler and fed to the new step's inputs there, and the host reads
them (detokenizes, checks stops, reports) while the GPU runs. A request that turns out to have
stopped was computed one step too far; that row is dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afdserve.core import InvalidRequest, Request, SamplingParams
from afdserve.layers.basic import to_device
from afdserve.output import append_token
from afdserve.runner import Executor, MicroBatchInput, fill_prompt_logprobs, prepare, sample_logits
from afdserve.sampler import DeviceSample, PenaltyTable, sample, sample_on_device
from afdserve.scheduler import Scheduler


def validate_request(ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> int:
    """Checks that need the model's limits (SamplingParams checked its own fields); returns the
    request's token limit, prompt plus output (its KV always fits: the cache holds at least one
    sequence of max_model_len, checked at start)."""
    if not ids:
        raise InvalidRequest("the prompt must contain at least one token", param="prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"token id {bad[0]} is out of the vocabulary (0..{vocab_size - 1})", param="prompt")
    if len(ids) >= max_model_len:
        raise InvalidRequest(f"the prompt has {len(ids)} tokens, but this model's maximum context length is "
                             f"{max_model_len} tokens (prompt plus at least one generated token)", param="prompt")
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"stop token id {bad[0]} is out of the vocabulary (0..{vocab_size - 1})",
                             param="stop_token_ids")
    bad = [t for t in params.logit_bias if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"logit_bias token id {bad[0]} is out of the vocabulary (0..{vocab_size - 1})",
                             param="logit_bias")
    bad = [t for t in params.allowed_token_ids or [] if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"allowed_token_ids: token id {bad[0]} is out of the vocabulary (0..{vocab_size - 1})",
                             param="allowed_token_ids")
    return max_model_len if params.max_tokens is None else min(max_model_len, len(ids) + params.max_tokens)


@dataclass
class _InFlight:
    """A launched step whose sampled tokens (and logprobs) the host has not read yet."""

    requests: list[Request]  # the rows that sample, in order
    sample: DeviceSample  # on the device: the next step's inputs read the tokens there
    host: list[torch.Tensor]  # ``sample.tensors()``, copied without waiting (pinned memory on CUDA)
    copied: torch.cuda.Event | None

    @property
    def tokens_dev(self) -> torch.Tensor:
        return self.sample.tokens_N

    @classmethod
    def launch(cls, requests: list[Request], sample: DeviceSample) -> _InFlight:
        dev = sample.tensors()
        if not sample.tokens_N.is_cuda:
            return cls(requests, sample, dev, None)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in dev]
        for h, d in zip(host, dev):
            h.copy_(d, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(sample.tokens_N.device))
        return cls(requests, sample, host, copied)

    def read(self) -> tuple[list[int], list[dict[int, float] | None]]:
        """The tokens and each row's logprobs (None where not asked for)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host[0].tolist(), self.sample.logprob_entries(self.host)


class Engine:
    def __init__(self, attn, executor: Executor, scheduler: Scheduler, max_model_len: int,
                 tokenizer, eos_ids: set[int], device: str | torch.device = "cpu", seed: int = 0,
                 async_scheduling: bool = False):
        self.attn, self.executor, self.scheduler = attn, executor, scheduler
        self.max_model_len, self.tokenizer, self.eos_ids = max_model_len, tokenizer, eos_ids
        self.device = device
        self.vocab_size = attn.cfg.vocab_size
        self.requests: dict[str, Request] = {}
        self.num_steps = 0
        self.async_scheduling = async_scheduling
        self.device_generator = torch.Generator(device=device).manual_seed(seed)
        self._inflight: _InFlight | None = None
        self._penalties: PenaltyTable | None = None  # penalised requests' token counts, on the device

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, arrival_time: float = 0.0) -> Request:
        """Validate and queue a request; raises InvalidRequest (nothing is queued) on bad input."""
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
        total = validate_request(prompt_token_ids, params, self.vocab_size, self.max_model_len)
        req = Request(request_id, list(prompt_token_ids), params, arrival_time=arrival_time,
                      max_total_tokens=total, prompt=prompt)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def abort_request(self, request_id: str) -> Request | None:
        req = self.requests.pop(request_id, None)
        if req is not None and not req.finished:
            self.scheduler.finish(req, "abort")
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def stats(self) -> dict:
        """Gauges for /metrics: running/waiting requests, KV usage, preemptions so far."""
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "kv_usage": s.blocks.usage,
                "num_preemptions": s.num_preemptions, "prefix_cache_queries": s.prefix_queries,
                "prefix_cache_hits": s.prefix_hits}

    def step(self, always_run: bool = False) -> list[Request]:
        """Run one step; returns the requests that got a token (finished ones included). With
        async scheduling those are the tokens of the step launched by the previous call.

        With ``always_run`` an empty plan still runs the executor with empty micro-batches:
        a disaggregated replica must take part in every global step."""
        if always_run or not self.async_scheduling:
            return self._step_sync(always_run)
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return self._read_inflight()
        inputs = [prepare(mb, self.scheduler.block_size, self.device) for mb in plan.micro_batches]
        self._fill_pending(inputs)
        for c in plan.chunks:
            c.request.num_computed += c.num_new
        hidden = self.executor.run(inputs)
        fill_prompt_logprobs(self.attn, inputs, hidden)  # a host read, only in steps that have such rows
        logits_SV = sample_logits(self.attn, inputs, hidden)
        sampling = [c.request for c in plan.chunks if c.samples]
        launched = _InFlight.launch(sampling, sample_on_device(logits_SV, sampling, self.device_generator,
                                                               self._penalty_table(logits_SV, sampling)))
        for req in sampling:
            req.num_pending += 1
        self.num_steps += 1
        done = self._read_inflight()  # the GPU runs the new step meanwhile
        self._inflight = launched
        return done

    def _penalty_table(self, logits_SV: torch.Tensor, sampling: list[Request]) -> PenaltyTable | None:
        """The penalised requests' token counts (made at the first one)."""
        if self._penalties is None and any(r.params.penalizes for r in sampling):
            self._penalties = PenaltyTable(logits_SV.shape[1], logits_SV.device)
        return self._penalties

    def _fill_pending(self, inputs: list[MicroBatchInput]) -> None:
        """Input rows whose token the running step samples read it on the device."""
        index = {id(r): i for i, r in enumerate(self._inflight.requests)} if self._inflight else {}
        for inp in inputs:
            if not inp.pending_rows:
                continue
            rows = to_device([row for row, _ in inp.pending_rows], torch.int64, self.device)
            src = to_device([index[id(req)] for _, req in inp.pending_rows], torch.int64, self.device)
            inp.token_ids_T.index_copy_(0, rows, self._inflight.tokens_dev.index_select(0, src))

    def _read_inflight(self) -> list[Request]:
        """The host reads the running step's tokens: append, detokenize, stop checks."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        got = []
        for req, token, logprobs in zip(inflight.requests, *inflight.read()):
            req.num_pending -= 1
            if req.finished:  # aborted, or stopped a step earlier than the scheduler could know
                continue
            reason = append_token(req, token, logprobs, self.tokenizer, self.eos_ids, self.max_model_len)
            if reason is not None:
                self.scheduler.finish(req, reason)
                self.requests.pop(req.request_id, None)
            got.append(req)
        return got

    def _step_sync(self, always_run: bool) -> list[Request]:
        plan = self.scheduler.schedule()
        if not plan.chunks and not always_run:
            return []
        inputs = [prepare(mb, self.scheduler.block_size, self.device) for mb in plan.micro_batches]
        hidden = self.executor.run(inputs)
        if not plan.chunks:
            return []
        fill_prompt_logprobs(self.attn, inputs, hidden)
        return self.update(plan, sample_logits(self.attn, inputs, hidden))

    def update(self, plan, logits_SV: torch.Tensor) -> list[Request]:
        self.num_steps += 1
        for c in plan.chunks:
            c.request.num_computed += c.num_new
        sampling = [c.request for c in plan.chunks if c.samples]
        tokens, logprobs = sample(logits_SV, sampling, self.device_generator,
                                  self._penalty_table(logits_SV, sampling))
        for req, token, lp in zip(sampling, tokens, logprobs):
            reason = append_token(req, token, lp, self.tokenizer, self.eos_ids, self.max_model_len)
            if reason is not None:
                self.scheduler.finish(req, reason)
                self.requests.pop(req.request_id, None)
        return sampling
