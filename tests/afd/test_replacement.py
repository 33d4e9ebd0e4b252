"""Live expert re-placement: requests keep running and keep their greedy tokens."""

from __future__ import annotations

import time

import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.expert.balance import zipf_loads

pytestmark = pytest.mark.slow


def _params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (4, 19, 33, 2, 11)]


def generate_through_replacement(engine, prompts, params) -> tuple[list[list[int]], list[int]]:
    """Run the requests to the end with a re-placement asked for at step 4 (mid-generation: a
    skewed load makes a very different placement); returns each request's tokens and the
    placement version after every step."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    done, versions, steps = {}, [], 0
    while engine.has_unfinished():
        for req in engine.step():
            if req.finished:
                done[req.request_id] = req.output_token_ids
        steps += 1
        if steps == 4:
            engine.rebalance(zipf_loads(2, 8, 1.5, seed=3))
        versions.append(engine.stats()["placement_version"])
    return [done[str(i)] for i in range(len(prompts))], versions


def test_tokens_identical_before_during_after_replacement(tiny_models):
    model = tiny_models["mixtral"]
    with LLM(model) as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(_prompts(), _params(40))]
    with LLM(model, attn_groups=2, expert_groups=3, micro_batches=2, num_redundant_experts=2) as llm:
        done, versions = generate_through_replacement(llm.engine, _prompts(), [_params(40)] * len(_prompts()))
        assert versions[0] == 0 and versions[-1] == 1, "the new placement was applied while requests ran"
        assert versions.index(1) < len(versions) - 2, "requests kept running after the switch"
        after = llm.generate(_prompts()[:2], _params(40))
    assert done == ref
    assert [o.outputs[0].token_ids for o in after] == ref[:2]


def test_skewed_router_gets_rebalanced(tiny_models):
    model = tiny_models["qwen3_moe"]
    prompts = [[5 + i] * (3 + i) for i in range(6)]
    with LLM(model, attn_groups=1, expert_groups=3, micro_batches=2, num_redundant_experts=2,
             router_skew=1.5, eplb_window_size=24) as llm:
        llm.generate(prompts, _params(30))
        before = llm.engine.stats()["expert_balancedness"]
        llm.engine.rebalance()
        while llm.engine.stats()["placement_version"] < 1:
            llm.engine.step(timeout_s=0.1)  # an idle deployment still applies it at the next step
            llm.generate([[1]], _params(1))
        llm.generate(prompts, _params(30))
        after = llm.engine.stats()["expert_balancedness"]
    assert after > before + 0.1, (before, after)


def test_periodic_replacement_happens_by_itself(tiny_models):
    with LLM(tiny_models["qwen3_moe"], expert_groups=3, micro_batches=1, num_redundant_experts=2,
             router_skew=1.5, enable_eplb=True, eplb_window_size=8, eplb_step_interval=8,
             eplb_threshold=0.99) as llm:
        deadline = time.monotonic() + 60
        while llm.engine.stats()["placement_version"] < 1 and time.monotonic() < deadline:
            llm.generate([[5, 6, 7], [8] * 9], _params(12))
        assert llm.engine.stats()["placement_version"] >= 1
