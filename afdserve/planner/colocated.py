"""The colocated baselines, attention and experts on the same GPUs, m = 1:

- TP (layout "colocated-tp", what plain vLLM TP runs): every GPU of a tensor-parallel group
  holds attention and all experts; T_step = L·(T_a(b) + T_e(pairs = b·K, experts = E)).
- EP (layout "colocated", what this runtime's ``--layout colocated`` runs, vLLM/SGLang's DP
  attention + expert parallel): n processes, one per GPU, each an attention replica of b
  sequences holding E/n experts; per layer two all-to-alls of the routed rows:
  T_step = L·(T_a(b) + T_e(pairs = n·b·K·⌈E/n⌉/E, experts = ⌈E/n⌉) + 2·T_c) (the busiest GPU's
  share of the routed rows; b·K when n divides E), T_c the rows one GPU sends
  to the others (eq. 6 at the measured or assumed utilisation); T_a includes splitting the rows
  by process where a profile measured that (``RouteCoeffs``).
"""

from __future__ import annotations

from afdserve.planner.core import Plan, PlanRequest, Rejection
from afdserve.planner.hardware import GPU
from afdserve.planner.perf_model import (
    attn_time_s,
    expert_memory_bytes,
    expert_time_s,
    groups_per_token,
    kv_bytes_per_seq,
    transfer_time_s,
    usable_bytes,
)

EP_SIZES = (2, 4, 8)  # processes (GPUs) of the expert-parallel colocated layout


def colocated_baselines(req: PlanRequest, rejections: list[Rejection]) -> list[Plan]:
    """The best colocated plan per (GPU type, tp) and per (GPU type, EP size) over both roles'
    GPU types, best per cost first."""
    gpus = {g.name: g for g in (*req.attn_gpus, *req.expert_gpus)}
    plans = [p for g in gpus.values() for tp in req.space.tp_values
             if (p := colocated_plan(req, g, tp, rejections)) is not None]
    plans += [p for g in gpus.values() for n in EP_SIZES if n <= req.shape.num_experts
              if (p := colocated_ep_plan(req, g, n, rejections)) is not None]
    return sorted(plans, key=lambda p: -p.tok_s_per_cost)


def colocated_ep_stages(req: PlanRequest, gpu: GPU, n: int, b: float) -> tuple[float, float, float]:
    """(T_a, T_e, T_c) of one layer of EP on n GPUs at b sequences per GPU."""
    shape = req.shape
    held = -(-shape.num_experts // n)
    rows_per_token = groups_per_token(shape.num_experts, shape.top_k, n) * (n - 1) / n  # to the other GPUs
    t_c = transfer_time_s(b * rows_per_token * shape.row_bytes, gpu.net_gb_per_s, req.coeffs.util_curve())
    pairs = b * n * shape.top_k * held / shape.num_experts  # the busiest GPU's share of all n·b·K
    t_a = attn_time_s(b, req.avg_seq_len, req.coeffs.attn(shape, gpu, 1)) + req.coeffs.route(shape, gpu).time_s(b, n)
    return t_a, expert_time_s(pairs, held, req.coeffs.expert(shape, gpu, 1)), t_c


def colocated_ep_step_s(req: PlanRequest, gpu: GPU, n: int, b: float) -> float:
    """One step of EP on n GPUs at b sequences per GPU: L·(T_a + T_e + 2·T_c) + sampling."""
    t_a, t_e, t_c = colocated_ep_stages(req, gpu, n, b)
    return req.shape.num_layers * (t_a + t_e + 2 * t_c) + req.sample_s


def colocated_ep_plan(req: PlanRequest, gpu: GPU, n: int, rejections: list[Rejection]) -> Plan | None:
    """DP attention + expert parallel on n GPUs: the largest per-GPU batch meeting the SLO."""
    from afdserve.planner.search import largest_true  # search imports this module

    shape = req.shape
    held = -(-shape.num_experts // n)
    weights = shape.attn_params_bytes + expert_memory_bytes(shape, held)
    usable = usable_bytes(gpu, 1, req.space.usable_mem_frac)
    per_seq = kv_bytes_per_seq(shape, req.avg_seq_len, 1)
    max_seqs = int((usable - weights) // per_seq) if weights < usable else 0
    what = f"EP x{n}"
    if max_seqs < 1:
        rejections.append(Rejection("colocated", gpu.name, 1, what,
                                    f"weights {weights / 1e9:.1f} GB + KV > usable {usable / 1e9:.1f} GB"))
        return None
    a, e = req.coeffs.attn(shape, gpu, 1), req.coeffs.expert(shape, gpu, 1)

    def step(b: float) -> float:
        return colocated_ep_step_s(req, gpu, n, b)

    b = largest_true(lambda b: step(b) <= req.slo_s, max_seqs)
    if b == 0:
        rejections.append(Rejection("colocated", gpu.name, 1, what, f"one sequence per GPU takes "
                                    f"{step(1) * 1e3:.0f} ms > SLO {req.slo_s * 1e3:.0f} ms"))
        return None
    t_a, t_e, t_c = colocated_ep_stages(req, gpu, n, b)
    mem_frac = (weights + b * per_seq) / usable
    return Plan(layout="colocated", attn_gpu=gpu.name, expert_gpu=gpu.name, tp_a=1, n_a=n, tp_e=1, n_e=n, m=1,
                b_a=b, t_a_s=t_a, t_e_s=t_e, t_c_s=t_c, step_s=step(b), num_gpus=n, cost=n * gpu.price_rel,
                power_w=n * gpu.power_w, attn_mem_frac=mem_frac, expert_mem_frac=mem_frac,
                limited_by="memory" if b == max_seqs else "slo", coeff_source=f"{a.source}/{e.source}")


def colocated_plan(req: PlanRequest, gpu: GPU, tp: int, rejections: list[Rejection]) -> Plan | None:
    """The largest batch meeting the SLO on one colocated TP group, or None (reason recorded)."""
    from afdserve.planner.search import largest_true  # search imports this module

    shape = req.shape
    weights = shape.attn_params_bytes + expert_memory_bytes(shape, shape.num_experts)
    usable = usable_bytes(gpu, tp, req.space.usable_mem_frac)
    per_seq = kv_bytes_per_seq(shape, req.avg_seq_len, tp)
    max_seqs = int((usable - weights) // per_seq) if weights < usable else 0
    if max_seqs < 1 or shape.num_heads % tp:
        why = (f"{shape.num_heads} heads not divisible by tp" if shape.num_heads % tp else
               f"weights {weights / 1e9:.1f} GB + KV > usable {usable / 1e9:.1f} GB")
        rejections.append(Rejection("colocated", gpu.name, tp, "any", why))
        return None
    a, e = req.coeffs.attn(shape, gpu, tp), req.coeffs.expert(shape, gpu, tp)

    def stages(b: int) -> tuple[float, float]:
        return attn_time_s(b, req.avg_seq_len, a), expert_time_s(b * shape.top_k, shape.num_experts, e)

    step = lambda b: shape.num_layers * sum(stages(b)) + req.sample_s  # noqa: E731
    b = largest_true(lambda b: step(b) <= req.slo_s, max_seqs)
    if b == 0:
        rejections.append(Rejection("colocated", gpu.name, tp, "any", f"one sequence takes {step(1) * 1e3:.0f} ms "
                                    f"> SLO {req.slo_s * 1e3:.0f} ms"))
        return None
    t_a, t_e = stages(b)
    mem_frac = (weights + b * per_seq) / usable
    return Plan(layout="colocated-tp", attn_gpu=gpu.name, expert_gpu=gpu.name, tp_a=tp, n_a=1, tp_e=tp, n_e=1, m=1,
                b_a=b, t_a_s=t_a, t_e_s=t_e, t_c_s=0.0, step_s=step(b), num_gpus=tp, cost=tp * gpu.price_rel,
                power_w=tp * gpu.power_w, attn_mem_frac=mem_frac, expert_mem_frac=mem_frac,
                limited_by="memory" if b == max_seqs else "slo", coeff_source=f"{a.source}/{e.source}")
