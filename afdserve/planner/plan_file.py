"""The plan file: what ``afdserve plan`` writes and the runtime's parallel options read.

    {"version": 1, "model": "Mixtral-8x22B",
     "parallel": {"attn_groups": 2, "attn_tp": 4, "expert_groups": 8, "expert_tp": 2,
                  "micro_batches": 2, "layout": "afd", "afd_transport": "auto"},
     "scheduler": {"max_num_seqs": 2000},
     "hardware": {"attn_gpu": "H20", "expert_gpu": "L40S"},
     "predicted": {"step_s": .., "throughput_tok_s": .., ...}}

``load_plan`` returns the option values keyed by the CLI destination names (attn_groups,
attn_tp, expert_groups, expert_tp, micro_batches, max_num_seqs, layout, and afd_transport when
the file names one: "ipc", "p2p" or "auto").
"""

from __future__ import annotations

import json

from afdserve.planner.core import Plan

PLAN_VERSION = 1
PARALLEL_KEYS = ("attn_groups", "attn_tp", "expert_groups", "expert_tp", "micro_batches")
LAYOUTS = ("afd", "colocated")


def plan_to_dict(plan: Plan, model: str, inputs: dict | None = None) -> dict:
    """The plan file contents; ``inputs`` (SLO, sequence length, ...) are kept for the record."""
    return {
        "version": PLAN_VERSION,
        "model": model,
        "parallel": {"attn_groups": plan.n_a, "attn_tp": plan.tp_a, "expert_groups": plan.n_e,
                     "expert_tp": plan.tp_e, "micro_batches": plan.m, "layout": plan.layout},
        "scheduler": {"max_num_seqs": plan.max_num_seqs},
        "eplb": {"num_redundant_experts": int((inputs or {}).get("num_redundant_experts", 0))},
        "hardware": {"attn_gpu": plan.attn_gpu, "expert_gpu": plan.expert_gpu},
        "predicted": {
            "step_s": plan.step_s, "tbt_s": plan.step_s, "throughput_tok_s": plan.throughput_tok_s,
            "tok_s_per_gpu": plan.tok_s_per_gpu, "tok_s_per_cost": plan.tok_s_per_cost,
            "tok_s_per_kw": plan.tok_s_per_kw, "global_batch": plan.global_batch, "b_a": plan.b_a,
            "t_a_s": plan.t_a_s, "t_e_s": plan.t_e_s, "t_c_s": plan.t_c_s, "num_gpus": plan.num_gpus,
            "cost": plan.cost, "conditions": plan.conditions, "limited_by": plan.limited_by,
            "coeff_source": plan.coeff_source,
        },
        "inputs": inputs or {},
    }


def write_plan(path: str, plan: Plan, model: str, inputs: dict | None = None) -> None:
    with open(path, "w") as f:
        json.dump(plan_to_dict(plan, model, inputs), f, indent=2)
        f.write("\n")


def load_plan(path: str) -> dict:
    """Runtime option values from a plan file, keyed by CLI destination names; checked."""
    with open(path) as f:
        d = json.load(f)
    if d.get("version") != PLAN_VERSION:
        raise ValueError(f"{path}: plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
    par, sched = d.get("parallel", {}), d.get("scheduler", {})
    out = {}
    for key in PARALLEL_KEYS:
        out[key] = _positive_int(par.get(key), f"{path}: parallel.{key}")
    out["max_num_seqs"] = _positive_int(sched.get("max_num_seqs"), f"{path}: scheduler.max_num_seqs")
    layout = par.get("layout", "afd")
    if layout not in LAYOUTS:
        raise ValueError(f"{path}: parallel.layout must be one of {LAYOUTS}, got {layout!r}")
    out["layout"] = layout
    transport = par.get("afd_transport")
    if transport is not None:
        from afdserve.config import AFD_TRANSPORTS

        if transport not in AFD_TRANSPORTS:
            raise ValueError(f"{path}: parallel.afd_transport must be one of {AFD_TRANSPORTS}, got {transport!r}")
        out["afd_transport"] = transport
    redundant = d.get("eplb", {}).get("num_redundant_experts", 0)
    if not isinstance(redundant, int) or redundant < 0:
        raise ValueError(f"{path}: eplb.num_redundant_experts must be an integer >= 0, got {redundant!r}")
    if redundant:
        out["num_redundant_experts"] = redundant
    return out


def _positive_int(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value
