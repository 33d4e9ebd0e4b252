"""What-if sweeps over one deployment: micro-batches (the paper's Fig. 14), attention groups
(Fig. 15) and routing skew. Each returns rows of plain numbers (JSON-ready)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from afdserve.planner.models import MoEShape
from afdserve.planner.perf_model import AfdLayout, Hardware, afd_stage_times_s, min_micro_batches
from afdserve.simulator.costs import Workload, build_costs, zipf_expert_load
from afdserve.simulator.replay import replay_fast
from afdserve.simulator.result import SimResult, summarize


@dataclass(frozen=True)
class SimSetup:
    """One deployment to simulate: model, parallel sizes, hardware + coefficients, workload."""

    shape: MoEShape
    layout: AfdLayout
    hw: Hardware
    workload: Workload

    @property
    def tokens_per_step(self) -> int:
        return self.workload.b_a * self.layout.m * self.layout.n_a


def run_setup(s: SimSetup) -> SimResult:
    return summarize(replay_fast(build_costs(s.shape, s.layout, s.hw, s.workload)), s.tokens_per_step)


def describe(s: SimSetup, r: SimResult) -> dict:
    """One row: the setup's sizes, the modelled stage times and the simulated outcome."""
    t_a, t_e, t_c = afd_stage_times_s(s.shape, s.layout, s.hw, s.workload.b_a, s.workload.avg_seq_len)
    lay = s.layout
    return {"n_a": lay.n_a, "tp_a": lay.tp_a, "n_e": lay.n_e, "tp_e": lay.tp_e, "m": lay.m, "b_a": s.workload.b_a,
            "num_gpus": lay.num_gpus, "t_a_s": t_a, "t_e_s": t_e, "t_c_s": t_c,
            "m_min": min_micro_batches(t_a, t_e, t_c), "tok_s_per_gpu": r.throughput_tok_s / lay.num_gpus,
            **r.to_dict()}


def sweep_micro_batches(s: SimSetup, ms: tuple[int, ...] = (1, 2, 3, 4)) -> list[dict]:
    """Fig. 14: each attention group keeps its m·b_a sequences, split into m micro-batches."""
    seqs = s.workload.b_a * s.layout.m
    rows = []
    for m in ms:
        sm = replace(s, layout=replace(s.layout, m=m), workload=replace(s.workload, b_a=max(1, round(seqs / m))))
        rows.append(describe(sm, run_setup(sm)))
    return _normalise(rows, "throughput_tok_s")


def sweep_attn_groups(s: SimSetup, n_as: tuple[int, ...]) -> list[dict]:
    """Fig. 15: more attention replicas at a fixed batch per replica; throughput per GPU."""
    rows = []
    for n_a in n_as:
        sn = replace(s, layout=replace(s.layout, n_a=n_a))
        rows.append(describe(sn, run_setup(sn)))
    return _normalise(rows, "tok_s_per_gpu")


def sweep_skew(s: SimSetup, alphas: tuple[float, ...]) -> list[dict]:
    """Zipf routing skew (alpha = 0: uniform) on the same deployment."""
    rows = []
    for alpha in alphas:
        load = zipf_expert_load(s.shape.num_experts, s.shape.top_k, alpha)
        sa = replace(s, workload=replace(s.workload, expert_load=load))
        rows.append({"alpha": alpha, "max_expert_share": float(load.max()), **describe(sa, run_setup(sa))})
    return _normalise(rows, "throughput_tok_s")


def _normalise(rows: list[dict], key: str) -> list[dict]:
    top = max(r[key] for r in rows) or 1.0
    for r in rows:
        r["normalised"] = r[key] / top
    return rows
