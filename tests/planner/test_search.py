from __future__ import annotations

from dataclasses import replace

import pytest

from afdserve.planner.core import PlanRequest, SearchSpace
from afdserve.planner.hardware import get_gpu
from afdserve.planner.models import PRESETS, MoEShape
from afdserve.planner.perf_model import AfdLayout, Hardware
from afdserve.planner.search import (
    attn_sides_for,
    candidates,
    expert_group_counts,
    expert_sides_for,
    largest_true,
    search,
    simulate_candidate,
)
from afdserve.simulator import Workload, build_costs, simulate

TOY = MoEShape("toy", hidden=2048, num_layers=6, num_heads=16, num_kv_heads=4, head_dim=128, num_experts=8,
               top_k=2, expert_intermediate=8192, vocab=32000)


def _toy_request(**space) -> PlanRequest:
    return PlanRequest(TOY, (get_gpu("H20"), get_gpu("L40S")), (get_gpu("L40S"),), slo_s=0.012, avg_seq_len=2048,
                       space=SearchSpace(**({"tp_values": (1, 2), "max_micro_batches": 3, "top": 5} | space)))


def test_largest_true():
    assert largest_true(lambda b: b <= 37, 100) == 37
    assert largest_true(lambda b: b <= 37, 20) == 20
    assert largest_true(lambda b: False, 100) == 0
    assert largest_true(lambda b: True, 0) == 0


def test_expert_group_counts_cover_every_experts_per_group():
    assert expert_group_counts(8, None) == [8, 4, 3, 2, 1]
    assert expert_group_counts(8, (3, 8, 12)) == [8, 3]


def test_bounded_search_returns_exactly_the_best_simulated_plans():
    req = _toy_request(expert_groups=(8, 4, 2))
    res = search(req)
    curve = req.coeffs.util_curve()
    brute, brute_runs = [], 0
    for a in attn_sides_for(req, []):
        for e in expert_sides_for(req, []):
            for cand in candidates(req, a, e, curve):
                plan, runs = simulate_candidate(req, cand, curve)
                brute_runs += runs
                if plan is not None:
                    brute.append(plan)
    brute.sort(key=lambda p: -p.tok_s_per_cost)
    assert len(res.plans) == 5 and res.simulated < brute_runs / 2
    assert [p.tok_s_per_cost for p in res.plans] == pytest.approx([p.tok_s_per_cost for p in brute[:5]])
    assert {p.attn_gpu for p in brute} == {"H20", "L40S"}  # heterogeneous: each role on each GPU given


def test_plans_meet_slo_and_memory_and_are_maximal():
    req = _toy_request()
    shape = req.shape
    for p in search(req).plans:
        assert p.step_s <= req.slo_s and p.attn_mem_frac <= 1 and p.expert_mem_frac <= 1
        lay = AfdLayout(p.tp_a, p.n_a, p.tp_e, p.n_e, p.m)
        a_gpu, e_gpu = get_gpu(p.attn_gpu), get_gpu(p.expert_gpu)
        hw = Hardware(a_gpu, e_gpu, req.coeffs.attn(shape, a_gpu, p.tp_a), req.coeffs.expert(shape, e_gpu, p.tp_e),
                      req.coeffs.util_curve())
        steps = [simulate(build_costs(shape, lay, hw, Workload(b, req.avg_seq_len))).step_time_s
                 for b in (p.b_a, p.b_a + 1)]
        assert steps[0] == pytest.approx(p.step_s)
        assert steps[1] > req.slo_s or p.limited_by == "memory"
        assert p.global_batch == p.b_a * p.m * p.n_a and p.max_num_seqs == p.b_a * p.m


def test_mixtral_8x22b_on_h20_and_l40s():
    req = PlanRequest(PRESETS["Mixtral-8x22B"], (get_gpu("H20"),), (get_gpu("L40S"),), 0.150, 730)
    res = search(req)
    assert res.plans and res.baselines
    best = res.plans[0]
    assert (best.attn_gpu, best.expert_gpu) == ("H20", "L40S") and best.step_s <= 0.150
    # one expert (56 layers x 604 MB = 33.8 GB) fits a 48 GB L40S, two do not: memory rules
    # out expert groups holding several experts unless tensor parallelism adds memory
    ruled = {(r.gpu, r.tp, r.what.split()[0]) for r in res.rejections if r.role == "expert"}
    assert ("L40S", 1, "n_e=4") in ruled and ("L40S", 2, "n_e=4") not in ruled
    assert all(p.n_e == 8 for p in res.plans if p.tp_e == 1)
    assert any(r.role == "colocated" and r.gpu == "L40S" and r.tp == 4 for r in res.rejections)
    assert best.tok_s_per_cost > res.baselines[0].tok_s_per_cost


def test_nothing_fits():
    small = replace(get_gpu("L20"), name="L20-24GB", memory_gb=24)  # one expert (33.8 GB) does not fit
    req = PlanRequest(PRESETS["Mixtral-8x22B"], (small,), (small,), 0.150, 730, space=SearchSpace(tp_values=(1,)))
    res = search(req)
    assert res.plans == [] and res.baselines == []
    assert {r.role for r in res.rejections} == {"expert", "colocated"}


def test_skewed_routing_lowers_the_best_plan_and_replicas_place_it():
    from afdserve.simulator.costs import with_placement, zipf_expert_load

    base = PlanRequest(PRESETS["Mixtral-8x22B"], (get_gpu("H20"),), (get_gpu("L40S"),), 0.15, 730.0)
    load = zipf_expert_load(8, 2, 1.2)
    uniform = search(base).plans[0].tok_s_per_cost
    skewed = search(replace(base, expert_load=load)).plans[0].tok_s_per_cost
    assert skewed < uniform
    wl = Workload(64, 730.0, expert_load=load)
    contiguous_max = with_placement(wl, 8, 4, 0).group_share.max()
    replicated = with_placement(wl, 8, 4, 2)
    assert replicated.group_share.max() < contiguous_max
    assert replicated.slots_held.max() == 3  # ceil((8 + 2) / 4) slots per group, copies in use


def test_expert_parallel_colocated_baseline_is_what_the_runtime_runs():
    """EP baselines (one process per GPU, experts split) next to the TP ones: a step is
    L·(T_a + T_e + 2·T_c) + sampling at the largest batch that meets the SLO and fits memory,
    each GPU holding E/n experts, and the plan file starts ``--layout colocated``."""
    from afdserve.planner.plan_file import plan_to_dict

    req = PlanRequest(PRESETS["Mixtral-8x7B"], (get_gpu("H200"),), (get_gpu("H200"),), 0.150, 730,
                      sample_s=0.002)
    res = search(req)
    ep = [p for p in res.baselines if p.layout == "colocated"]
    tp = [p for p in res.baselines if p.layout == "colocated-tp"]
    assert ep and tp and {p.n_a for p in ep} == {2, 4, 8}
    shape = req.shape
    for p in ep:
        assert (p.n_a, p.n_e, p.tp_a, p.tp_e, p.m, p.num_gpus) == (p.n_a, p.n_a, 1, 1, 1, p.n_a)
        assert p.step_s == pytest.approx(shape.num_layers * (p.t_a_s + p.t_e_s + 2 * p.t_c_s) + 0.002)
        assert p.step_s <= 0.150 and p.t_c_s > 0
        assert p.attn_mem_frac <= 1.0
        par = plan_to_dict(p, shape.name)["parallel"]
        assert par["layout"] == "colocated" and par["attn_groups"] == par["expert_groups"] == p.n_a
    # fewer experts per GPU leave more memory for KV: the per-GPU batch grows with n
    by_n = {p.n_a: p.b_a for p in ep}
    assert by_n[2] <= by_n[4] <= by_n[8]
