"""Decode steps replayed from CUDA graphs give the eager engine's tokens and logits."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def test_graphed_decode_matches_eager(tiny_models):
    from afdserve import LLM, SamplingParams

    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (1, 7, 16, 17, 30)]  # 5: padded to 8
    # requests finish at different steps: the batch shrinks 5 -> 4 -> 3 -> 2, inside a bucket too
    # (4 -> 3: the row a request left must not keep writing its KV slot)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0) for n in (20, 4, 20, 9, 14)]
    outs = {}
    for eager in (True, False):
        with LLM(tiny_models["qwen3_moe"], device="cuda", dtype="float32", max_num_seqs=8,
                 enforce_eager=eager) as llm:
            assert (type(llm.engine.executor).__name__ == "GraphedExecutor") == (not eager)
            outs[eager] = [o.outputs[0] for o in llm.generate(prompts, params)]
            one = llm.generate(prompts[:3], params[:3])  # a batch of 3 replays the bucket of 4
            assert [o.outputs[0].token_ids for o in one] == [o.token_ids for o in outs[eager][:3]]
    for a, b in zip(outs[True], outs[False]):
        assert a.token_ids == b.token_ids
        lp_a = torch.tensor([next(iter(d.values())) for d in a.logprobs])
        lp_b = torch.tensor([next(iter(d.values())) for d in b.logprobs])
        assert torch.allclose(lp_a, lp_b, atol=1e-3)


def test_async_scheduling_matches_sync_with_graphs(tiny_models):
    """On the GPU the next step's inputs read the pending tokens on the device, through the
    replayed graphs; tokens, finish reasons and the freed KV match the synchronous engine."""
    from afdserve import LLM, SamplingParams

    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (1, 7, 16, 17, 30, 41)]
    # logprobs, penalties and logit bias: computed on the device, the steps stay asynchronous
    extra = [{}, {"logprobs": 2}, {"frequency_penalty": 1.0, "repetition_penalty": 1.3},
             {"logit_bias": {17: 8.0, 20: -3.0}, "logprobs": 0}, {"presence_penalty": -1.0}, {}]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **x)
              for n, x in zip((20, 3, 20, 11, 20, 7), extra)]
    outs, lps = {}, {}
    for flag in (False, True):
        with LLM(tiny_models["qwen3_moe"], device="cuda", dtype="float32", max_num_seqs=8,
                 max_num_batched_tokens=32, async_scheduling=flag) as llm:
            assert llm.engine.async_scheduling == flag
            got = [o.outputs[0] for o in llm.generate(prompts, params)]
            outs[flag] = [(o.token_ids, o.finish_reason) for o in got]
            lps[flag] = [[(t, v) for d in o.logprobs or [] for t, v in sorted(d.items())] for o in got]
            sched = llm.engine.scheduler
            assert sched.blocks.num_free == sched.blocks.num_blocks
    assert outs[True] == outs[False]
    assert [len(x) for x in lps[True]] == [len(x) for x in lps[False]] and lps[True][1] and lps[True][3]
    for a, b in zip(lps[True], lps[False]):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=1e-4)
