"""Continuous batching for one attention replica: a token budget per step, chunked prefill,
preemption (by recomputation) when KV blocks run out, prefix caching (a request admitted
starts after the longest prefix of full blocks already in the cache), and the split of a step
into ``m`` micro-batches of similar cost."""

from __future__ import annotations

import time
from collections import deque

from afdserve.core import Request, RequestStatus, ScheduledChunk, StepPlan
from afdserve.kv_cache import BlockAllocator, blocks_needed, prefix_hashes


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, num_blocks: int,
                 block_size: int, micro_batches: int = 1, skip_prefill: bool = False,
                 prefix_caching: bool = False):
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.skip_prefill = skip_prefill  # benchmarks: see SchedulerConfig.benchmark_skip_prefill
        self.block_size, self.m = block_size, micro_batches
        self.blocks = BlockAllocator(num_blocks, caching=prefix_caching and not skip_prefill)
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up / found in the cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        req.queued_at = time.monotonic()
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        """Running requests first (decode or the rest of a prefill), then admit waiting ones."""
        budget, chunks, preempted = self.budget, [], []
        if self.blocks.caching:
            for req in self.running:
                self._register(req)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending and req.num_tokens >= req.max_total_tokens:
                i += 1  # its pending token is its last: it finishes when the host sees it
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if self._reserve(req, n, preempted):
                chunks.append(ScheduledChunk(req, req.num_computed, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            self._take_cached_prefix(req)
            start = max(req.num_computed, req.num_tokens - 1) if self.skip_prefill else req.num_computed
            n = min(req.num_tokens - start, budget)
            if not self._grow(req, start + n):
                self._drop_blocks(req)
                break
            if self.blocks.caching and req.params.prompt_logprobs is None:  # those do not look up
                self.prefix_queries += req.num_tokens
                self.prefix_hits += req.num_computed
            req.num_computed = start
            if req.queue_s is None:
                req.queue_s = time.monotonic() - req.queued_at
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(ScheduledChunk(req, req.num_computed, n))
            budget -= n
        return StepPlan(split_micro_batches(chunks, self.m), preempted)

    def _reserve(self, req: Request, n: int, preempted: list[Request]) -> bool:
        """Blocks for ``n`` more tokens of a running request, preempting the newest running
        requests until they fit. False when ``req`` itself had to be preempted."""
        while not self._grow(req, req.num_computed + n):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        return True

    def _take_cached_prefix(self, req: Request) -> None:
        """A request without KV starts after its longest cached prefix of full blocks (at least
        its last known token is computed: its logits are needed). Not with prompt logprobs,
        which need every prompt position computed."""
        if not self.blocks.caching or req.block_ids or req.params.prompt_logprobs is not None:
            return
        known = req.all_token_ids
        full = min(len(known), req.num_tokens - 1) // self.block_size
        req.block_hashes = prefix_hashes(known[:full * self.block_size], self.block_size, req.block_hashes)
        hit = self.blocks.lookup(req.block_hashes[:full])
        req.block_ids, req.num_computed, req.num_registered = hit, len(hit) * self.block_size, len(hit)

    def _register(self, req: Request) -> None:
        """Register the request's blocks that are full and computed (their KV is in the cache)."""
        full = min(req.num_computed, len(req.prompt_token_ids) + len(req.output_token_ids)) // self.block_size
        if full <= req.num_registered:
            return
        if len(req.block_hashes) < full:
            req.block_hashes = prefix_hashes(req.all_token_ids[:full * self.block_size], self.block_size,
                                             req.block_hashes)
        for b in range(req.num_registered, full):
            self.blocks.register(req.block_ids[b], req.block_hashes[b])
        req.num_registered = full

    def _drop_blocks(self, req: Request) -> None:
        self.blocks.free(req.block_ids[::-1])  # last block first: evicted first, the prefix stays findable
        req.block_ids, req.num_computed, req.num_registered = [], 0, 0

    def _grow(self, req: Request, num_tokens: int) -> bool:
        extra = blocks_needed(num_tokens, self.block_size) - len(req.block_ids)
        if extra > self.blocks.num_free:
            return False
        if extra > 0:
            req.block_ids += self.blocks.allocate(extra)
        return True

    def _preempt(self, req: Request) -> None:
        """Drop the request's KV; it is recomputed (prompt + generated so far) when resumed,
        from its cached prefix if its blocks are still cached."""
        self._drop_blocks(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        """Release a request's blocks and slot, whether it ran, waited or was aborted."""
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        if self.blocks.caching and req in self.running:
            self._register(req)  # its last full blocks too
        self.blocks.free(req.block_ids[::-1])
        req.block_ids = []
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)


def chunk_cost(chunk: ScheduledChunk) -> float:
    """Relative attention cost: per-token work plus the KV context it reads."""
    return chunk.num_new + (chunk.start + chunk.num_new) / 16.0


def split_micro_batches(chunks: list[ScheduledChunk], m: int) -> list[list[ScheduledChunk]]:
    """Split a step into ``m`` micro-batches of similar cost (longest-processing-time
    first); each request lies wholly in one micro-batch. Some may be empty."""
    if m == 1:
        return [chunks]
    loads, bins = [0.0] * m, [[] for _ in range(m)]
    order = sorted(range(len(chunks)), key=lambda i: -chunk_cost(chunks[i]))
    for i in order:
        b = min(range(m), key=lambda j: loads[j])
        bins[b].append(i)
        loads[b] += chunk_cost(chunks[i])
    return [[chunks[i] for i in sorted(b)] for b in bins]
