"""CPU benchmarks of the planner and the simulator (not timed tests).

1. A full plan search: Mixtral-8x22B, H20 attention, L40S experts, 150 ms SLO, 730 tokens
   (target: under 5 s); also every catalog GPU for each role (81 pairings), for reference.
2. A simulation of 1,000 GPUs x 60 layers x 4 micro-batches x 100 steps, with routing skew
   and sequence-length spread so that every node differs (target: under 60 s).

    python benchmarks/planner_cpu.py            # writes benchmarks/results/planner_cpu.json
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from afdserve.planner.core import PlanRequest  # noqa: E402
from afdserve.planner.hardware import CATALOG, get_gpu  # noqa: E402
from afdserve.planner.models import PRESETS  # noqa: E402
from afdserve.planner.perf_model import AfdLayout, Hardware, roofline_attn_coeffs, roofline_expert_coeffs  # noqa: E402
from afdserve.planner.search import search  # noqa: E402
from afdserve.simulator import Workload, build_costs, replay_fast, summarize, zipf_expert_load  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "planner_cpu.json")


def bench_search(attn: tuple[str, ...], expert: tuple[str, ...], repeats: int = 3) -> dict:
    req = PlanRequest(PRESETS["Mixtral-8x22B"], tuple(get_gpu(n) for n in attn), tuple(get_gpu(n) for n in expert),
                      slo_s=0.150, avg_seq_len=730)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = search(req)
        times.append(time.perf_counter() - t0)
    best = res.plans[0]
    return {"seconds": min(times), "seconds_all": times, "candidates": res.candidates, "simulations": res.simulated,
            "best": f"{best.n_a}x{best.attn_gpu}/tp{best.tp_a} + {best.n_e}x{best.expert_gpu}/tp{best.tp_e}, "
                    f"m={best.m}, b_a={best.b_a}, {best.tok_s_per_cost:.0f} tok/s/cost"}


def bench_simulation(steps: int = 100) -> dict:
    """744 attention GPUs (tp 1) + 32 expert groups of 8 GPUs = 1,000 GPUs; a 60-layer
    variant of Scaled-MoE (32 experts, top-4) on H20 / L40S roofline costs."""
    shape = replace(PRESETS["Scaled-MoE"], name="Scaled-MoE-60L", num_layers=60)
    lay = AfdLayout(tp_a=1, n_a=744, tp_e=8, n_e=32, m=4)
    h20, l40s = get_gpu("H20"), get_gpu("L40S")
    hw = Hardware(h20, l40s, roofline_attn_coeffs(shape, h20, 1), roofline_expert_coeffs(shape, l40s, 8))
    wl = Workload(b_a=8, avg_seq_len=730, seq_len_cv=0.5, expert_load=zipf_expert_load(32, 4, 0.3), steps=steps)
    t0 = time.perf_counter()
    costs = build_costs(shape, lay, hw, wl)
    t1 = time.perf_counter()
    res = summarize(replay_fast(costs), wl.b_a * lay.m * lay.n_a)
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "build_costs_s": t1 - t0, "replay_s": t2 - t1, "gpus": lay.num_gpus,
            "layers": shape.num_layers, "micro_batches": lay.m, "steps": steps,
            "ops_replayed": 6 * shape.num_layers * lay.m * steps, "step_time_ms": res.step_time_s * 1e3,
            "tbt_p99_ms": float(sorted(res.tbt_s)[int(0.99 * (len(res.tbt_s) - 1))]) * 1e3,
            "expert_util": res.expert_util, "attn_util": res.attn_util}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(RESULTS)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    pair = bench_search(("H20",), ("L40S",))
    every = bench_search(tuple(CATALOG), tuple(CATALOG), repeats=1)
    sim = bench_simulation()
    out = {"device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "python": platform.python_version(), "load_avg": os.getloadavg()},
           "commit": _commit(), "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
           "search_h20_l40s": pair, "search_every_gpu_pair": every, "simulation_1000_gpus": sim}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"{'benchmark':<44} {'seconds':>8} {'target':>7}")
    print(f"{'plan search Mixtral-8x22B H20/L40S':<44} {pair['seconds']:>8.2f} {'< 5':>7}   {pair['best']}")
    print(f"{'plan search, every catalog GPU per role':<44} {every['seconds']:>8.2f} {'-':>7}   {every['best']}")
    print(f"{'simulate 1000 GPUs x 60 L x 4 mb x 100 steps':<44} {sim['seconds']:>8.2f} {'< 60':>7}   "
          f"step {sim['step_time_ms']:.1f} ms, expert util {sim['expert_util']:.2f}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
