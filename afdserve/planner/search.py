"""Deployment plan search: the paper's Algorithm 1, extended to expert groups holding several
experts (n_e < E) and to a GPU type per role.

For every attention side (GPU, tp_a) whose weights fit and every expert side (GPU, tp_e, n_e)
whose experts fit, for m in 1..N_m and n_a around the balance point, the largest per-micro-
batch size b_a meeting the SLO (and the KV memory) is found by binary search through the
simulator. Objective: throughput per unit cost, (B / T_step) / Σ GPU prices.

Exactness of the shortcut: eq. 5 with T_f = max(T_a, T_e, T_c) is a lower bound on the
simulated step time (the busiest resource, attention, experts or a link, must run its m·L ops
in a row, plus fill and drain), so the b_a and the throughput per cost it allows bound the
simulated ones from above. Candidates are simulated in
order of that bound, and the search stops once the bound falls below the ``top``-th best
simulated plan: the plans returned are exactly the best ``top`` that full simulation of
every candidate would return.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from afdserve.planner.colocated import colocated_baselines
from afdserve.planner.core import Plan, PlanRequest, Rejection, SearchResult
from afdserve.planner.hardware import GPU
from afdserve.planner.perf_model import (
    AfdLayout,
    AttnCoeffs,
    ExpertCoeffs,
    Hardware,
    UtilCurve,
    afd_stage_times_s,
    attn_memory_bytes,
    expert_memory_bytes,
    kv_bytes_per_seq,
    pipeline_conditions,
    step_time_lower_bound_s,
    usable_bytes,
)
from afdserve.simulator import Workload, build_costs, simulate
from afdserve.simulator.costs import with_placement


@dataclass(frozen=True)
class AttnSide:
    gpu: GPU
    tp: int
    coeffs: AttnCoeffs
    max_seqs: int  # sequences whose KV fits next to the weights: m·b_a <= max_seqs
    usable_bytes: float


@dataclass(frozen=True)
class ExpertSide:
    gpu: GPU
    tp: int
    n_e: int
    coeffs: ExpertCoeffs
    mem_frac: float


@dataclass(frozen=True)
class Candidate:
    attn: AttnSide
    expert: ExpertSide
    m: int
    n_a: int
    b_hi: int  # largest b_a that the step-time bound and memory allow
    bound: float  # throughput per cost at b_hi by that bound (an upper bound)


def search(req: PlanRequest) -> SearchResult:
    """The best AFD plans (exact top ``req.space.top``), colocated baselines, and what memory ruled out."""
    rejections: list[Rejection] = []
    attn_sides = list(attn_sides_for(req, rejections))
    expert_sides = list(expert_sides_for(req, rejections))
    curve = req.coeffs.util_curve()
    cands = [c for a in attn_sides for e in expert_sides for c in candidates(req, a, e, curve)]
    cands.sort(key=lambda c: -c.bound)
    plans: list[Plan] = []
    simulated = 0
    for cand in cands:
        if len(plans) >= req.space.top and cand.bound <= plans[-1].tok_s_per_cost:
            break
        plan, runs = simulate_candidate(req, cand, curve)
        simulated += runs
        if plan is not None:
            plans.append(plan)
            plans.sort(key=lambda p: -p.tok_s_per_cost)
            del plans[req.space.top:]
    return SearchResult(plans, colocated_baselines(req, rejections), rejections, len(cands), simulated)


def attn_sides_for(req: PlanRequest, rejections: list[Rejection]):
    """(GPU, tp_a) whose attention weights fit, with the KV capacity left (eq. 8)."""
    shape = req.shape
    for gpu in req.attn_gpus:
        for tp in req.space.tp_values:
            if shape.num_heads % tp:
                rejections.append(Rejection("attention", gpu.name, tp, "any", f"{shape.num_heads} heads not "
                                            f"divisible by tp_a={tp}"))
                continue
            usable = usable_bytes(gpu, tp, req.space.usable_mem_frac)
            per_seq = kv_bytes_per_seq(shape, req.avg_seq_len, tp)
            max_seqs = int((usable - shape.attn_params_bytes) // per_seq)
            if max_seqs < 1:
                rejections.append(Rejection("attention", gpu.name, tp, "any", f"P_a {shape.attn_params_bytes / 1e9:.1f}"
                                            f" GB + one sequence's KV > usable {usable / 1e9:.1f} GB"))
                continue
            yield AttnSide(gpu, tp, req.coeffs.attn(shape, gpu, tp), max_seqs, usable)


def expert_sides_for(req: PlanRequest, rejections: list[Rejection]):
    """(GPU, tp_e, n_e) whose ceil(E/n_e) experts of every layer fit in the group's memory."""
    shape = req.shape
    for gpu in req.expert_gpus:
        for tp in req.space.tp_values:
            usable = usable_bytes(gpu, tp, req.space.usable_mem_frac)
            for n_e in expert_group_counts(shape.num_experts, req.space.expert_groups):
                held = math.ceil((shape.num_experts + req.num_redundant_experts) / n_e)
                need = expert_memory_bytes(shape, held)
                if need > usable:
                    rejections.append(Rejection("expert", gpu.name, tp, f"n_e={n_e} ({held} experts/group)",
                                                f"needs {need / 1e9:.1f} GB > usable {usable / 1e9:.1f} GB"))
                    continue
                yield ExpertSide(gpu, tp, n_e, req.coeffs.expert(shape, gpu, tp), need / usable)


def expert_group_counts(num_experts: int, allowed: tuple[int, ...] | None) -> list[int]:
    """n_e values worth trying: for each experts-per-group c, the fewest groups ceil(E/c)."""
    if allowed is not None:
        return sorted({n for n in allowed if 1 <= n <= num_experts}, reverse=True)
    return sorted({math.ceil(num_experts / c) for c in range(1, num_experts + 1)}, reverse=True)


def attn_group_counts(req: PlanRequest, a: AttnSide, e: ExpertSide, m: int) -> list[int]:
    """n_a near the balance points (T_a = T_e): the paper's rule n* = k1·E / (k3·K·c) for
    large batches (c = experts per group; k1·E/(k3·K) when c = 1), and the exact balance at
    the largest batch the KV memory allows (where memory, not the SLO, sets b_a)."""
    shape, c, cap = req.shape, math.ceil(req.shape.num_experts / e.n_e), req.space.max_attn_groups
    k1, k3 = a.coeffs.k1_s(req.avg_seq_len), e.coeffs.k3_s_per_token
    per_group_k3 = k3 * shape.top_k * c / shape.num_experts  # T_e growth per attention group per token
    stars = [_ratio(k1, per_group_k3, cap)]
    b = a.max_seqs // m
    if b >= 1:
        t_e_fixed = e.coeffs.k4_s_per_expert * c + e.coeffs.overhead_s
        stars.append(_ratio(k1 * b + a.coeffs.k2_s - t_e_fixed, per_group_k3 * b, cap))
    r, out = req.space.n_a_radius, set()
    for star in stars:
        lo, hi = max(1, math.floor(star) - r + 1), min(cap, math.ceil(star) + r - 1)
        out.update(range(lo, max(lo, hi) + 1))
    return sorted(out)


def _ratio(num: float, den: float, cap: float) -> float:
    """num / den clamped to [0, cap] (a zero den, e.g. a profile whose k3 fitted to 0, gives cap)."""
    return cap if den <= 0 else min(cap, max(0.0, num / den))


def candidates(req: PlanRequest, a: AttnSide, e: ExpertSide, curve: UtilCurve):
    """Every (m, n_a) of one attention side and one expert side, with its throughput-per-cost bound."""
    hw = Hardware(a.gpu, e.gpu, a.coeffs, e.coeffs, curve, req.coeffs.route(req.shape, a.gpu))
    for m in range(1, req.space.max_micro_batches + 1):
        for n_a in attn_group_counts(req, a, e, m):
            lay = AfdLayout(a.tp, n_a, e.tp, e.n_e, m)
            b_hi = largest_true(lambda b, lay=lay: bound_step_s(req, lay, hw, b) <= req.slo_s, a.max_seqs // m)
            if b_hi:
                bound = b_hi * m * n_a / bound_step_s(req, lay, hw, b_hi) / layout_cost(lay, a.gpu, e.gpu)
                yield Candidate(a, e, m, n_a, b_hi, bound)


def bound_step_s(req: PlanRequest, lay: AfdLayout, hw: Hardware, b_a: int) -> float:
    """Eq. 5 (with the links counted as resources too) plus sampling: a lower bound on the
    simulated step, exact when the ping-pong conditions hold."""
    t_a, t_e, t_c = afd_stage_times_s(req.shape, lay, hw, b_a, req.avg_seq_len)
    return step_time_lower_bound_s(t_a, t_e, t_c, lay.m, req.shape.num_layers) + req.sample_s


def simulate_candidate(req: PlanRequest, c: Candidate, curve: UtilCurve) -> tuple[Plan | None, int]:
    """Largest b_a whose simulated step meets the SLO (binary search below the bound b_hi)."""
    lay = AfdLayout(c.attn.tp, c.n_a, c.expert.tp, c.expert.n_e, c.m)
    hw = Hardware(c.attn.gpu, c.expert.gpu, c.attn.coeffs, c.expert.coeffs, curve,
                  req.coeffs.route(req.shape, c.attn.gpu))
    runs, steps = 0, {}

    def step_s(b: int) -> float:
        nonlocal runs
        runs += 1
        wl = Workload(b, req.avg_seq_len, sample_s=req.sample_s, expert_load=req.expert_load)
        wl = with_placement(wl, req.shape.num_experts, lay.n_e, req.num_redundant_experts)
        steps[b] = simulate(build_costs(req.shape, lay, hw, wl)).step_time_s
        return steps[b]

    b = largest_true(lambda b: step_s(b) <= req.slo_s, c.b_hi)
    if b == 0:
        return None, runs
    return make_plan(req, c, lay, hw, b, steps[b]), runs


def make_plan(req: PlanRequest, c: Candidate, lay: AfdLayout, hw: Hardware, b: int, step: float) -> Plan:
    t_a, t_e, t_c = afd_stage_times_s(req.shape, lay, hw, b, req.avg_seq_len)
    attn_used = attn_memory_bytes(req.shape, lay.m, b, req.avg_seq_len, lay.tp_a)
    a_gpu, e_gpu = c.attn.gpu, c.expert.gpu
    return Plan(
        layout="afd", attn_gpu=a_gpu.name, expert_gpu=e_gpu.name, tp_a=lay.tp_a, n_a=lay.n_a, tp_e=lay.tp_e,
        n_e=lay.n_e, m=lay.m, b_a=b, t_a_s=t_a, t_e_s=t_e, t_c_s=t_c, step_s=step, num_gpus=lay.num_gpus,
        cost=layout_cost(lay, a_gpu, e_gpu),
        power_w=lay.tp_a * lay.n_a * a_gpu.power_w + lay.tp_e * lay.n_e * e_gpu.power_w,
        attn_mem_frac=attn_used / c.attn.usable_bytes, expert_mem_frac=c.expert.mem_frac,
        limited_by="memory" if b == c.attn.max_seqs // lay.m else "slo",
        conditions=pipeline_conditions(t_a, t_e, t_c, lay.m),
        coeff_source=f"attn: {c.attn.coeffs.source}, expert: {c.expert.coeffs.source}",
    )


def layout_cost(lay: AfdLayout, attn_gpu: GPU, expert_gpu: GPU) -> float:
    return lay.tp_a * lay.n_a * attn_gpu.price_rel + lay.tp_e * lay.n_e * expert_gpu.price_rel


def largest_true(ok: Callable[[int], bool], hi: int) -> int:
    """Largest b in 1..hi with ok(b), for ok true up to a point and false after; 0 if none.

    ``hi`` is tried first (the bound is usually exact), then a binary search.
    """
    if hi < 1:
        return 0
    if ok(hi):
        return hi
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
