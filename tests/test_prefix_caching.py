"""Prefix caching: the block allocator's reference counts and LRU reuse, and engines whose
outputs with cached prefixes equal those without (chunked prefill, preemption, async)."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.kv_cache import BlockAllocator, prefix_hashes

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_allocator_shares_registered_blocks_and_evicts_least_recently_freed():
    a = BlockAllocator(4, caching=True)
    h = prefix_hashes(list(range(48)), 16)
    assert len(h) == 3 and len(set(h)) == 3
    assert prefix_hashes(list(range(40)), 16) == h[:2]  # a prefix's hashes are the same
    assert prefix_hashes([9] + list(range(1, 48)), 16)[1] != h[1]  # the chain carries earlier blocks
    x = a.allocate(3)
    for block, hh in zip(x, h):
        a.register(block, hh)
    assert a.lookup(h) == x and a.num_free == 1  # shared: no new memory
    a.free(x)
    a.free(x)  # both holders gone: cached, evictable, counted free
    assert a.num_free == 4 and a.usage == 0.0
    assert a.lookup(h[:1]) == x[:1] and a.num_free == 3
    a.free(x[:1])
    # the untouched block goes first, then the cached ones in the order they were freed
    got = a.allocate(2)
    assert got[0] not in x and got[1] == x[1]
    assert a.lookup(h) == x[:1]  # block 1 was reused: the prefix stops after block 0


@pytest.fixture(scope="module")
def model(tiny_models) -> str:
    return tiny_models["qwen3_moe"]


def _workload() -> list[list[int]]:
    """Prompts sharing a 40-token system prefix (2 full blocks), one repeated, one unrelated."""
    gen = torch.Generator().manual_seed(3)
    system = torch.randint(3, 300, (40,), generator=gen).tolist()
    tails = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 19, 1, 33)]
    other = torch.randint(3, 300, (21,), generator=gen).tolist()
    return [system + t for t in tails] + [system + tails[1], other]


@pytest.mark.parametrize("options", [dict(), dict(max_num_batched_tokens=24, num_kv_blocks=14, max_model_len=160),
                                     dict(async_scheduling=True)], ids=["plain", "chunked_preempted", "async"])
def test_cached_prefixes_give_the_uncached_tokens(model, options):
    prompts = _workload()
    with LLM(model, enable_prefix_caching=False, **options) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        assert llm.engine.stats()["prefix_cache_hits"] == 0
    with LLM(model, **options) as llm:
        first = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]  # one after another
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]  # all at once, all cached
        stats, sched = llm.engine.stats(), llm.engine.scheduler
        assert sched.blocks.num_free == sched.blocks.num_blocks
    assert first == want and again == want
    assert stats["prefix_cache_hits"] >= 32 * 4  # every later request found the system prefix at least


def test_each_prompt_token_computed_once_for_identical_prompts(model):
    """A prompt seen before recomputes only its last partial block (at least its last token)."""
    prompt = list(range(10, 60))  # 50 tokens: 3 full blocks of 16 before the last token
    with LLM(model) as llm:
        llm.generate([prompt], GREEDY)
        before = llm.engine.stats()
        llm.generate([prompt], GREEDY)
        after = llm.engine.stats()
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 48
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == 50


def test_prompt_logprobs_requests_compute_every_position(model):
    prompt = list(range(10, 60))
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    with LLM(model) as llm:
        a = llm.generate([prompt], params)[0].prompt_logprobs
        b = llm.generate([prompt], params)[0].prompt_logprobs  # the prefix is cached, but not used
    assert len(a) == len(b) == 50 and all(x.keys() == y.keys() for x, y in zip(a[1:], b[1:]))


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(attn_groups=2, expert_groups=2, micro_batches=2, layout="afd"),
                                     dict(attn_groups=2, layout="colocated")], ids=["afd", "colocated"])
def test_layouts_cache_prefixes_on_each_replica(model, options):
    """Each attention replica caches its own prefixes; tokens equal the single-process engine's
    without caching, and the frontend reports the hits."""
    prompts = _workload()
    with LLM(model, enable_prefix_caching=False) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    with LLM(model, **options) as llm:
        first = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        hits = llm.engine.stats()["prefix_cache_hits"]
    assert first == want and again == want and hits > 0


def test_eviction_takes_a_prefix_from_its_end(model):
    """A finished request's blocks are freed last block first, so when memory runs short the
    tail of a cached prefix goes before its head, and the head is still found."""
    a = list(range(100, 165))  # 65 tokens: 4 full blocks cached when it finishes
    b = list(range(200, 240))  # 40 tokens, unrelated: needs 3 blocks, 2 free plus one evicted
    one = SamplingParams(temperature=0, max_tokens=1)
    with LLM(model, num_kv_blocks=6, max_model_len=96) as llm:
        llm.generate([a], one)
        llm.generate([b], one)
        before = llm.engine.stats()["prefix_cache_hits"]
        llm.generate([a], one)
        assert llm.engine.stats()["prefix_cache_hits"] - before == 48  # blocks 0-2; block 3 was evicted
