"""Async scheduling (the next step launched before the host reads this one's tokens) gives the
synchronous engine's outputs: tokens, text, finish reasons, under chunked prefill, preemption,
stops, aborts, requests arriving mid-run and requests that force a synchronous step."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.core import Request
from afdserve.sampler import probs_batch, sample_on_device

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_models) -> str:
    return tiny_models["qwen3_moe"]


def _prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 300, (k,), generator=gen).tolist() for k in [1, 4, 9, 16, 17, 23, 35, 50][:n]]


def _summary(outs) -> list[tuple]:
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for o in outs for c in o.outputs]


def _both(model: str, prompts, params, **options) -> tuple[list, list, LLM]:
    with LLM(model, async_scheduling=False, **options) as llm:
        ref = llm.generate(prompts, params)
    llm = LLM(model, async_scheduling=True, **options)
    assert llm.engine.async_scheduling
    return _summary(ref), _summary(llm.generate(prompts, params)), llm


def test_greedy_with_chunked_prefill_and_preemption(model):
    # a budget below the longest prompt chunks the prefill; 12 blocks of 16 tokens cannot hold
    # eight sequences of up to 74 tokens, so running requests (some with a token pending) are preempted
    ref, got, llm = _both(model, _prompts(8), GREEDY, max_num_batched_tokens=20, num_kv_blocks=12, max_model_len=192)
    with llm:
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.scheduler.blocks.num_free == llm.engine.scheduler.blocks.num_blocks
        assert not llm.engine.has_unfinished()
    assert got == ref


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=30, min_tokens=6),  # EOS only counts after 6 tokens
    SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),  # up to the context limit
], ids=["max_tokens", "min_tokens_eos", "context_limit"])
def test_length_and_eos_finishes(model, params):
    prompts = _prompts(5)
    with LLM(model, async_scheduling=False, max_model_len=64) as llm:
        free = llm.generate(prompts[:1], GREEDY)[0].outputs[0].token_ids
    eos = {free[2], free[7]}  # tokens the model does produce: some requests stop early
    got = {}
    for flag in (False, True):
        with LLM(model, async_scheduling=flag, max_model_len=64) as llm:
            llm.engine.eos_ids = eos
            got[flag] = _summary(llm.generate(prompts, params))
            assert llm.engine.scheduler.blocks.num_free == llm.engine.scheduler.blocks.num_blocks
    assert got[True] == got[False]
    ref = got[False]
    if params.max_tokens is None:
        assert {r[2] for r in ref} <= {"length", "stop"} and any(len(r[0]) + 1 > 30 for r in ref)


def test_stop_strings_and_stop_token_ids(model):
    with LLM(model, async_scheduling=False) as llm:
        free = llm.generate("Hello world", GREEDY)[0].outputs[0]
    text = free.text
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2)
                if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    prompts = ["Hello world", "Once upon a time", "a b c"]
    for params in (SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                   SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[free.token_ids[4]])):
        ref, got, llm = _both(model, prompts, params)
        llm.shutdown()
        assert got == ref and ref[0][2] == "stop"


def test_seeded_requests_match_the_synchronous_engine(model):
    """Seeded sampling (each seed draws from its own generator on the device) in the same batch
    as requests with logprobs, penalties and plain ones: every output as without async, and
    every step stays asynchronous."""
    prompts = _prompts(6)
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2), GREEDY,
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=5),
              SamplingParams(temperature=0.9, max_tokens=24, ignore_eos=True, seed=9, top_p=0.8)]
    with LLM(model, async_scheduling=False) as llm:
        ref = _summary(llm.generate(prompts, params))
    with LLM(model, async_scheduling=True) as llm:
        sync_steps = []
        step_sync = llm.engine._step_sync
        llm.engine._step_sync = lambda always_run: sync_steps.append(1) or step_sync(always_run)
        got = _summary(llm.generate(prompts, params))
    assert got == ref and not sync_steps


def test_abort_and_arrivals_while_a_step_is_in_flight(model):
    prompts = _prompts(5)
    # seeded, with logprobs: sampled on the device like the others
    with_lp = SamplingParams(temperature=0.8, seed=11, max_tokens=8, ignore_eos=True, logprobs=1)
    with LLM(model, async_scheduling=False) as llm:
        alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
        alone_lp = llm.generate([prompts[4]], with_lp)[0].outputs[0]
    with LLM(model, async_scheduling=True) as llm:
        eng = llm.engine
        eng.add_request("a", prompts[0], GREEDY)
        eng.add_request("b", prompts[1], GREEDY)
        for _ in range(4):
            eng.step()
        assert eng._inflight is not None and eng.requests["b"].num_pending == 1
        eng.abort_request("b")  # its token is still on the GPU
        eng.add_request("c", prompts[2], GREEDY)  # arrives mid-run
        eng.step()
        eng.add_request("d", prompts[3], GREEDY)
        eng.step()
        eng.add_request("e", prompts[4], with_lp)
        reqs = {rid: eng.requests[rid] for rid in ("a", "c", "d", "e")}
        eng.step()
        assert eng._inflight is not None  # a seeded request does not make the step synchronous
        while eng.has_unfinished():
            eng.step()
        assert [reqs[r].output_token_ids for r in ("a", "c", "d")] == [alone[0], alone[2], alone[3]]
        assert reqs["e"].output_token_ids == alone_lp.token_ids
        got_lp = [v for d in reqs["e"].output_logprobs for v in d.values()]
        assert got_lp == pytest.approx([v for d in alone_lp.logprobs for v in d.values()], abs=1e-4)
        assert eng.scheduler.blocks.num_free == eng.scheduler.blocks.num_blocks


def test_device_sampler_draws_from_the_filtered_distribution():
    """The exponential race picks each token with the probability ``probs_batch`` gives it
    (temperature, top-k, top-p, min-p), greedy rows take the argmax."""
    gen = torch.Generator().manual_seed(0)
    logits_V = torch.randn(12, generator=gen) * 2
    cases = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=4),
             SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=1.0, min_p=0.1)]
    draws = 20000
    for p in cases:
        reqs = [Request("r", [1], p)] * draws + [Request("g", [1], SamplingParams(temperature=0))]
        tokens = sample_on_device(logits_V.expand(draws + 1, -1), reqs, torch.Generator().manual_seed(1)).tokens_N
        assert tokens[-1] == logits_V.argmax()
        freq = torch.bincount(tokens[:-1], minlength=12).float() / draws
        probs = probs_batch(logits_V.float()[None], [p])[0]
        assert (freq[probs == 0] == 0).all(), p
        assert (freq - probs).abs().max() < 0.015, (p, freq, probs)


def test_layouts_reject_async_scheduling(model):
    from afdserve.config import ConfigError, make_config
    with pytest.raises(ConfigError, match="async_scheduling"):
        make_config(model, attn_groups=1, expert_groups=2, layout="afd", async_scheduling=True)


def _one_row(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The filters one row at a time, as the sampler computed them before ``probs_batch``."""
    logits_V = logits_V / p.temperature
    if 0 < p.top_k < logits_V.numel():
        logits_V = logits_V.masked_fill(logits_V < torch.topk(logits_V, p.top_k).values[-1], float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if p.min_p > 0:
        probs_V = probs_V.masked_fill(probs_V < p.min_p * probs_V.max(), 0.0)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs_V, descending=True)
        probs_V = probs_V.scatter(0, idx, sorted_p.masked_fill(sorted_p.cumsum(0) - sorted_p > p.top_p, 0.0))
    return probs_V / probs_V.sum()


def test_batched_probabilities_equal_the_per_row_ones():
    """``probs_batch`` (one set of launches per step) gives each row what a plain one-row
    filter gives it, rows with different options mixed, ties at the k-th logit kept."""
    from afdserve.sampler import probs_batch
    gen = torch.Generator().manual_seed(2)
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=4),
              SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=1.0, min_p=0.1),
              SamplingParams(temperature=0.5, top_k=7, top_p=0.6, min_p=0.02),
              SamplingParams(temperature=2.0, top_k=50), SamplingParams(temperature=1.0, top_k=3)]
    logits_RV = torch.randn(len(params), 50, generator=gen) * 3
    logits_RV[-1, :6] = 9.0  # six-way tie at the top: top_k=3 keeps all six, as the one-row filter does
    got = probs_batch(logits_RV, params)
    want = torch.stack([_one_row(row, p) for row, p in zip(logits_RV, params)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert (got[-1, :6] > 0).all() and (got[-1, 6:] == 0).all()


def test_a_queued_host_bound_request_waits_without_stopping_async_steps(model):
    """A host-bound request behind a full batch (max_num_seqs) leaves the running ones stepping
    asynchronously until it can be admitted; every output as without async."""
    prompts = _prompts(3)
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=4, max_tokens=5, ignore_eos=True, logprobs=1)]
    ref = {}
    for flag in (False, True):
        with LLM(model, async_scheduling=flag, max_num_seqs=2) as llm:
            eng = llm.engine
            for i, (p, sp) in enumerate(zip(prompts, params)):
                eng.add_request(str(i), p, sp)
            reqs = dict(eng.requests)
            inflight_while_queued = 0
            while eng.has_unfinished():
                eng.step()
                inflight_while_queued += eng._inflight is not None and reqs["2"] in eng.scheduler.waiting
            if flag:
                assert inflight_while_queued >= 3
            out = [(r.output_token_ids, r.finish_reason) for r in reqs.values()]
            lp = [v for d in reqs["2"].output_logprobs for v in d.values()]
        if flag:
            assert out == ref["out"] and lp == pytest.approx(ref["lp"], abs=1e-4)
        ref = {"out": out, "lp": lp}


def test_logprobs_penalties_and_logit_bias_step_asynchronously(model):
    """Logprobs (of the raw distribution, top-k and the sampled token), penalties (counting the
    token still in flight) and logit bias are computed on the device: those requests keep every
    step asynchronous, with the synchronous engine's tokens and logprobs."""
    prompts = _prompts(6) + _prompts(1)
    with LLM(model, async_scheduling=False) as llm:
        free = llm.generate(prompts[:1], GREEDY)[0].outputs[0].token_ids
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logit_bias={free[3]: 100.0, 7: -5.0},
                             logprobs=0),
              SamplingParams(temperature=0.9, top_k=20, max_tokens=10, ignore_eos=True, logit_bias={11: 3.0}),
              GREEDY,
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=1.5, logprobs=1),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8,
                             presence_penalty=0.7, logit_bias={free[5]: 2.0}),
              # the bias makes token 100 win until its count outweighs it: the count must include the
              # token still in flight, or 100 wins once more than on the synchronous engine
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias={100: 6.0},
                             frequency_penalty=2.0)]
    out = {}
    for flag in (False, True):
        with LLM(model, async_scheduling=flag) as llm:
            eng = llm.engine
            for i, (p, sp) in enumerate(zip(prompts, params)):
                eng.add_request(str(i), p, sp)
            reqs, sync_steps = dict(eng.requests), 0
            while eng.has_unfinished():
                eng.step()
                sync_steps += eng._inflight is None and eng.has_unfinished()
            if flag:
                assert sync_steps == 0
            out[flag] = [(r.output_token_ids, r.output_logprobs) for r in reqs.values()]
    assert out[True][1][0].count(free[3]) == 10  # the +100 bias wins every step
    assert 100 in out[True][6][0]
    for i, ((tok_a, lp_a), (tok_s, lp_s)) in enumerate(zip(out[True], out[False])):
        if i == 2:  # sampled: the device draws from its own generator
            continue
        assert tok_a == tok_s
        assert [sorted(d) for d in lp_a] == [sorted(d) for d in lp_s]
        assert [v for d in lp_a for v in d.values()] == pytest.approx([v for d in lp_s for v in d.values()], abs=1e-5)
    assert [len(d) for d in out[True][0][1]] == [len(d) for d in out[False][0][1]]


def test_prompt_logprobs_under_preemption(model):
    """Prompt logprobs over chunked prefills, with preemptions recomputing prompts: each prompt
    token's entry once, equal in both modes and to a run with room for everything."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=1)
    prompts = _prompts(8)
    with LLM(model, async_scheduling=False) as llm:
        roomy = [o.prompt_logprobs for o in llm.generate(prompts, params)]
    for flag in (False, True):
        with LLM(model, async_scheduling=flag, max_num_batched_tokens=20, num_kv_blocks=12, max_model_len=192) as llm:
            got = [o.prompt_logprobs for o in llm.generate(prompts, params)]
            assert llm.engine.scheduler.num_preemptions > 0
        for g, w, p in zip(got, roomy, prompts):
            assert len(g) == len(p) and g[0] is None
            for a, b in zip(g[1:], w[1:]):
                assert a.keys() == b.keys() and list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)
