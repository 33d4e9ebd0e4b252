"""Expert load balancing, measured on CPU (issue 10), in one run:

1. the replica placement against its lower bound and naive contiguous placement, on Zipf
   loads (8-128 experts, 2-16 groups, 0-16 redundant slots, several exponents);
2. a real disaggregated run of a tiny model with the router-skew knob: balancedness before
   and after a live re-placement;
3. the simulator's predicted throughput for those measured loads at Mixtral-8x7B scale
   (H100s), contiguous placement against the balanced one with redundant slots.

Writes benchmarks/results/eplb_cpu.json and prints a short table.
Run: python benchmarks/eplb_cpu.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from afdserve import LLM, SamplingParams
from afdserve.expert.balance import balanced_placement, contiguous, group_loads, lower_bound, zipf_loads
from afdserve.planner.hardware import get_gpu
from afdserve.planner.models import PRESETS
from afdserve.planner.perf_model import AfdLayout, Hardware, roofline_attn_coeffs, roofline_expert_coeffs
from afdserve.simulator.costs import Workload, build_costs
from afdserve.simulator.replay import replay_fast
from afdserve.simulator.result import summarize
from afdserve.tiny import make_tiny

OUT = os.path.join(os.path.dirname(__file__), "results", "eplb_cpu.json")


def placement_sweep() -> dict:
    rows = []
    t0 = time.perf_counter()
    for e in (8, 32, 128):
        for g in (2, 4, 8, 16):
            for r in (0, 2, 8, 16):
                for s in (0.6, 1.0, 1.4):
                    if g > e:
                        continue
                    slots = -(-(e + r) // g)
                    loads = zipf_loads(4, e, s, seed=e + g + r)
                    ours = group_loads(*balanced_placement(loads, g, slots, e + r), loads, slots).max(-1).values
                    naive = group_loads(*contiguous(4, e, g, slots), loads, slots).max(-1).values
                    lb = lower_bound(loads, g, slots, e + r)
                    rows.append({"experts": e, "groups": g, "redundant": r, "zipf": s,
                                 "ours_over_bound": float((ours / lb).max()),
                                 "naive_over_bound": float((naive / lb).max())})
    ratios = [x["ours_over_bound"] for x in rows]
    return {"cases": len(rows), "seconds": time.perf_counter() - t0,
            "median_over_bound": statistics.median(ratios), "max_over_bound": max(ratios),
            "within_2pct": sum(x <= 1.02 for x in ratios) / len(rows),
            "within_5pct": sum(x <= 1.05 for x in ratios) / len(rows),
            "median_naive_over_bound": statistics.median(x["naive_over_bound"] for x in rows),
            "worst": sorted(rows, key=lambda x: -x["ours_over_bound"])[:5], "rows": rows}


def live_run(model: str) -> dict:
    prompts = [[5 + i] * (3 + i) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLM(model, device="cpu", expert_groups=3, micro_batches=2, num_redundant_experts=2, router_skew=1.5,
             eplb_window_size=32) as llm:
        llm.generate(prompts, params)
        before = llm.engine.stats()
        loads = llm.engine.load_window.loads()
        llm.engine.rebalance()
        while llm.engine.stats()["placement_version"] < 1:
            llm.generate([[1]], SamplingParams(max_tokens=1))
        llm.generate(prompts, params)
        after = llm.engine.stats()
    return {"expert_groups": 3, "redundant": 2, "router_skew": 1.5,
            "balancedness_before": before["expert_balancedness"], "balancedness_after": after["expert_balancedness"],
            "group_tokens_before": before["expert_group_tokens"], "group_tokens_after": after["expert_group_tokens"],
            "loads_LE": loads.tolist()}


def simulate_scale(loads_LE: list[list[float]]) -> dict:
    """Mixtral-8x7B on H100s, 4 expert groups of 2 GPUs, m=3: a small batch (4 attention GPUs,
    b_a=128: expert GEMMs memory-bound) and a large one (16 attention GPUs, b_a=512)."""
    return {f"n_a{n_a}_b{b_a}": _simulate(loads_LE, n_a, b_a) for n_a, b_a in ((4, 128), (16, 512))}


def _simulate(loads_LE: list[list[float]], n_a: int, b_a: int) -> dict:
    shape, gpu = PRESETS["Mixtral-8x7B"], get_gpu("H100")
    lay = AfdLayout(tp_a=1, n_a=n_a, tp_e=2, n_e=4, m=3)
    hw = Hardware(gpu, gpu, roofline_attn_coeffs(shape, gpu, 1), roofline_expert_coeffs(shape, gpu, 2))
    measured = torch.tensor(loads_LE, dtype=torch.float64)
    loads = measured[torch.arange(shape.num_layers) % measured.shape[0]]  # tile the tiny model's layers
    out = {}
    for name, redundant in (("contiguous", 0), ("balanced_r2", 2), ("balanced_r4", 4)):
        slots = -(-(shape.num_experts + redundant) // lay.n_e)
        if redundant == 0:
            phy2log, share = contiguous(shape.num_layers, shape.num_experts, lay.n_e, slots)
        else:
            phy2log, share = balanced_placement(loads, lay.n_e, slots, shape.num_experts + redundant)
        gl = group_loads(phy2log, share, loads, slots)
        held = (phy2log.view(shape.num_layers, lay.n_e, slots) >= 0).sum(-1).max(0).values
        wl = Workload(b_a=b_a, avg_seq_len=730, expert_load=(loads / loads.sum(-1, keepdim=True)).numpy(),
                      group_share=(gl / gl.sum(-1, keepdim=True)).numpy(), slots_held=held.numpy(), steps=2)
        r = summarize(replay_fast(build_costs(shape, lay, hw, wl)), b_a * lay.m * lay.n_a)
        out[name] = {"throughput_tok_s": r.throughput_tok_s, "step_time_s": r.step_time_s,
                     "expert_util": r.expert_util, "max_group_share": float((gl / gl.sum(-1, keepdim=True)).max())}
    base = out["contiguous"]["throughput_tok_s"]
    for v in out.values():
        v["gain_over_contiguous"] = v["throughput_tok_s"] / base
    return {"model": "Mixtral-8x7B", "gpu": "H100 (roofline)", "layout": vars(lay), "b_a": b_a, **out}


def main() -> None:
    sweep = placement_sweep()
    with tempfile.TemporaryDirectory() as tmp:
        live = live_run(make_tiny("qwen3_moe", os.path.join(tmp, "m"), seed=1))
    sim = simulate_scale(live["loads_LE"])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"device": {"cpu": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
              "commit": commit, "command": "python benchmarks/eplb_cpu.py",
              "placement": sweep, "live": live, "simulated": sim}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1)
    print(f"placement: {sweep['cases']} cases in {sweep['seconds']:.1f} s; most-loaded group / lower bound: "
          f"median {sweep['median_over_bound']:.3f}, max {sweep['max_over_bound']:.3f}, "
          f"{100 * sweep['within_5pct']:.0f}% within 5%; naive median {sweep['median_naive_over_bound']:.2f}")
    print(f"live CPU run (skew 1.5, 3 groups, 2 redundant): balancedness {live['balancedness_before']:.3f} -> "
          f"{live['balancedness_after']:.3f}")
    for point, res in sim.items():
        for name in ("contiguous", "balanced_r2", "balanced_r4"):
            v = res[name]
            print(f"simulated Mixtral-8x7B {point:12s} {name:12s}: {v['throughput_tok_s']:9.0f} tok/s  "
                  f"x{v['gain_over_contiguous']:.2f}  max group share {v['max_group_share']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
