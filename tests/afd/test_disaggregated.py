"""Disaggregated attention/expert workers give the single-process engine's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

# (n_a, tp_a, n_e, tp_e, m)
TOPOLOGIES = [(1, 1, 1, 1, 1), (1, 1, 2, 1, 3), (2, 1, 1, 1, 2), (3, 1, 2, 1, 4), (1, 2, 2, 1, 2),
              (2, 1, 3, 2, 3)]
BUDGET = 32  # tokens per step: the 45-token prompt is prefilled in chunks


def _workload() -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) pairs of mixed lengths: 1 token to beyond the step budget."""
    gen = torch.Generator().manual_seed(11)
    lens = [(3, 12), (45, 8), (1, 10), (17, 6), (9, 14), (30, 5)]
    return [(torch.randint(3, 300, (n,), generator=gen).tolist(), k) for n, k in lens]


@pytest.fixture(scope="module")
def model(tiny_models) -> str:
    return tiny_models["qwen2_moe"]  # shared expert + qkv bias + sharded checkpoint


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    with LLM(model, max_num_batched_tokens=BUDGET) as llm:
        return [llm.generate([p], _params(k))[0].outputs[0].token_ids for p, k in _workload()]


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _run_staggered(engine, work) -> dict[str, list[int]]:
    """First one request alone (other replicas idle), then the rest arriving over several steps."""
    done: dict[str, list[int]] = {}
    pending = list(enumerate(work))
    i, (prompt, k) = pending.pop(0)
    engine.add_request(str(i), prompt, _params(k))
    steps = 0
    while engine.has_unfinished() or pending:
        if pending and steps % 3 == 2:
            i, (prompt, k) = pending.pop(0)
            engine.add_request(str(i), prompt, _params(k))
        for req in engine.step():
            if req.finished:
                done[req.request_id] = req.output_token_ids
        _check_outstanding(engine)
        steps += 1
    return done


def _check_outstanding(frontend) -> None:
    """The frontend's running count of each replica's KV work equals a recount."""
    for g in frontend.conns:
        recount = sum(r.max_total_tokens - len(r.output_token_ids) for rid, r in frontend.requests.items()
                      if frontend.group_of[rid] == g and not r.finished)
        assert frontend.outstanding_tokens(g) == recount, g


@pytest.mark.parametrize("topo", TOPOLOGIES, ids=lambda t: "na{}_tpa{}_ne{}_tpe{}_m{}".format(*t))
def test_afd_matches_single_process(model, reference, topo):
    n_a, tp_a, n_e, tp_e, m = topo
    with LLM(model, max_num_batched_tokens=BUDGET, attn_groups=n_a, attn_tp=tp_a, expert_groups=n_e,
             expert_tp=tp_e, micro_batches=m, layout="afd") as llm:
        done = _run_staggered(llm.engine, _workload())
        batch = llm.generate([p for p, _ in _workload()[:3]], _params(6))
    assert [done[str(i)] for i in range(len(reference))] == reference
    assert [o.outputs[0].token_ids for o in batch] == [r[:6] for r in reference[:3]]


# the shared-slot transport (CPU: shared memory): several senders and receivers, m > 1, TP on both sides
IPC_TOPOLOGIES = [(1, 1, 1, 1, 2), (3, 1, 2, 1, 4), (2, 2, 3, 2, 3)]


@pytest.mark.parametrize("topo", IPC_TOPOLOGIES, ids=lambda t: "na{}_tpa{}_ne{}_tpe{}_m{}".format(*t))
def test_afd_over_shared_slots_matches_single_process(model, reference, topo):
    n_a, tp_a, n_e, tp_e, m = topo
    with LLM(model, max_num_batched_tokens=BUDGET, attn_groups=n_a, attn_tp=tp_a, expert_groups=n_e,
             expert_tp=tp_e, micro_batches=m, layout="afd", afd_transport="ipc") as llm:
        done = _run_staggered(llm.engine, _workload())
    assert [done[str(i)] for i in range(len(reference))] == reference


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_colocated_matches_single_process(model, reference, ranks):
    """Every process an attention replica and an expert group."""
    with LLM(model, max_num_batched_tokens=BUDGET, attn_groups=ranks, layout="colocated") as llm:
        assert llm.config.parallel.expert_groups == ranks
        done = _run_staggered(llm.engine, _workload())
        batch = llm.generate([p for p, _ in _workload()[:3]], _params(6))
        stats = llm.engine.stats()
    assert [done[str(i)] for i in range(len(reference))] == reference
    assert [o.outputs[0].token_ids for o in batch] == [r[:6] for r in reference[:3]]
    assert sum(stats["expert_group_tokens"]) > 0 and len(stats["expert_group_tokens"]) == ranks


def test_colocated_refuses_live_replacement(model):
    from afdserve.config import ConfigError
    from afdserve.expert.balance import zipf_loads

    with LLM(model, attn_groups=2, layout="colocated") as llm:
        mc = llm.config.model_config
        with pytest.raises(ConfigError, match="colocated"):
            llm.engine.rebalance(zipf_loads(mc.num_layers, mc.num_experts, 1.5))
        out = llm.generate([_workload()[0][0]], _params(4))[0].outputs[0].token_ids
    assert len(out) == 4


@pytest.mark.parametrize("options", [dict(attn_groups=2, expert_groups=2, micro_batches=2, layout="afd"),
                                     dict(attn_tp=2, expert_groups=2, micro_batches=2, layout="afd"),
                                     dict(attn_groups=2, layout="colocated")], ids=["afd", "afd_tp2", "colocated"])
def test_prompt_logprobs_reach_the_frontend(model, options):
    """Prompt logprobs computed on an attention leader (over chunked prefills) arrive with the
    first token and equal the single-process engine's; so do seeded samples."""
    prompts = [p for p, _ in _workload()]
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=2, prompt_logprobs=2)  # seeded: a generator
    with LLM(model, max_num_batched_tokens=BUDGET) as llm:
        ref = llm.generate(prompts, params)
    with LLM(model, max_num_batched_tokens=BUDGET, **options) as llm:
        outs = llm.generate(prompts, params)
    # a seed's draws do not depend on the batch, so the sampled tokens agree too
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    got, want = [o.prompt_logprobs for o in outs], [o.prompt_logprobs for o in ref]
    for g, w in zip(got, want):
        assert len(g) == len(w) and g[0] is None
        for a, b in zip(g[1:], w[1:]):
            assert a.keys() == b.keys() and list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)
