"""Disaggregated decode steps replayed as CUDA graphs (shared-slot transport, both sides
captured together) give the single-process engine's greedy tokens. Runs on one GPU (the
ranks share it: Gloo carries the few tensor collectives) or more."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

LAYOUTS = {
    "m1": dict(attn_groups=1, expert_groups=1, micro_batches=1, afd_transport="ipc"),
    "m2_auto": dict(attn_groups=1, expert_groups=1, micro_batches=2),  # "auto" picks ipc (GPUs by UUID)
    "m3": dict(attn_groups=1, expert_groups=1, micro_batches=3, afd_transport="ipc"),
    "na2_ne2_m2": dict(attn_groups=2, expert_groups=2, micro_batches=2, afd_transport="ipc"),
}


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (1, 7, 33, 20, 64)]


def _params(n: int) -> list[SamplingParams]:
    """Requests that finish at different steps: micro-batches shrink, also inside a bucket."""
    return [SamplingParams(temperature=0, max_tokens=t, ignore_eos=True) for t in (12, 4, 12, 7, 10)[:n]]


def _generate(model: str, prompts, **options) -> list[list[int]]:
    params = _params(len(prompts))
    with LLM(model, device="cuda", dtype="float32", max_num_seqs=8, max_num_batched_tokens=48, **options) as llm:
        if "layout" in options:
            info = llm.engine.info
            assert all(i["cuda_graph_buckets"] == [1, 2, 4, 8] for i in info.values()), info
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def reference(tiny_models) -> list[list[int]]:
    return _generate(tiny_models["mixtral"], _prompts(), enforce_eager=True)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_graphed_afd_matches_single_process(tiny_models, reference, name):
    """Chunked prefills mixed with decodes run eagerly; the decode steps after them replay
    the graphs (five requests over m micro-batches: buckets 1..4, empty micro-batches)."""
    got = _generate(tiny_models["mixtral"], _prompts(), layout="afd", **LAYOUTS[name])
    assert got == reference


def test_graphed_afd_one_request(tiny_models, reference):
    """One request over three micro-batches: two of them empty in every replayed step."""
    got = _generate(tiny_models["mixtral"], [_prompts()[0]], layout="afd", **LAYOUTS["m3"])
    assert got == [reference[0]]


def test_graphs_recaptured_after_live_replacement(tiny_models, reference):
    """A new placement mid-generation: both sides capture their steps again (the old graphs
    read the old routing tables and experts) and the tokens stay the same."""
    from tests.afd.test_replacement import generate_through_replacement

    with LLM(tiny_models["mixtral"], device="cuda", dtype="float32", max_num_seqs=8, max_num_batched_tokens=48,
             layout="afd", afd_transport="ipc", attn_groups=2, expert_groups=3, micro_batches=2,
             num_redundant_experts=2) as llm:
        done, versions = generate_through_replacement(llm.engine, _prompts(), _params(5))
        assert versions[-1] == 1 and versions.index(1) < len(versions) - 2
    assert done == reference
