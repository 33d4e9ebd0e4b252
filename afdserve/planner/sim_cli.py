"""``afdserve simulate``: replay one deployment (from flags, a plan file, or the planner's best
plan) with skew and length spread, or sweep m / attention groups / skew into PNG + JSON."""

from __future__ import annotations

import argparse
import json
import math
import os

from afdserve.planner.cli import dump_json, handles_errors, request_from_args
from afdserve.planner.perf_model import AfdLayout, Hardware
from afdserve.planner.plan_file import load_plan
from afdserve.planner.search import search
from afdserve.simulator.costs import Workload, with_placement
from afdserve.simulator.sweeps import SimSetup, describe, run_setup, sweep_attn_groups, sweep_micro_batches, sweep_skew

_PARALLEL = ("attn_groups", "attn_tp", "expert_groups", "expert_tp", "micro_batches", "max_num_seqs")


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", default=None, help="plan file to simulate (default: the planner's best plan)")
    p.add_argument("--attn-groups", type=int, default=None)
    p.add_argument("--attn-tp", type=int, default=None)
    p.add_argument("--expert-groups", type=int, default=None)
    p.add_argument("--expert-tp", type=int, default=None)
    p.add_argument("--micro-batches", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences per attention group (b_a = this / m)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len-cv", type=float, default=0.0, help="coefficient of variation of context lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", choices=["m", "attn-groups", "skew"], default=None)
    p.add_argument("--sweep-values", default=None, help="comma-separated x values (default depends on the sweep)")
    p.add_argument("--out-dir", default="sim_out", help="where sweeps write their PNG and JSON")


def setup_from_args(args: argparse.Namespace) -> SimSetup:
    """The deployment to simulate: explicit flags, else a plan file, else the planner's best plan."""
    if args.plan and not (args.attn_gpu and args.expert_gpu):
        with open(args.plan) as f:
            hw_names = json.load(f)["hardware"]
        args.attn_gpu = args.attn_gpu or hw_names["attn_gpu"]
        args.expert_gpu = args.expert_gpu or hw_names["expert_gpu"]
    req = request_from_args(args, top=1)
    opts = load_plan(args.plan) if args.plan else {}
    opts.update({k: getattr(args, k) for k in _PARALLEL if getattr(args, k) is not None})
    if any(k not in opts for k in _PARALLEL):
        best = search(req).plans
        if not best:
            raise ValueError("no plan meets the SLO and memory limits; give the parallel sizes explicitly")
        b = best[0]
        planned = dict(zip(_PARALLEL, (b.n_a, b.tp_a, b.n_e, b.tp_e, b.m, b.max_num_seqs)))
        opts = planned | opts
    lay = AfdLayout(opts["attn_tp"], opts["attn_groups"], opts["expert_tp"], opts["expert_groups"],
                    opts["micro_batches"])
    a_gpu, e_gpu = req.attn_gpus[0], req.expert_gpus[0]
    hw = Hardware(a_gpu, e_gpu, req.coeffs.attn(req.shape, a_gpu, lay.tp_a),
                  req.coeffs.expert(req.shape, e_gpu, lay.tp_e), req.coeffs.util_curve(),
                  req.coeffs.route(req.shape, a_gpu))
    wl = Workload(max(1, opts["max_num_seqs"] // lay.m), req.avg_seq_len, args.seq_len_cv, req.expert_load,
                  args.steps, req.sample_s, args.seed)
    wl = with_placement(wl, req.shape.num_experts, lay.n_e, req.num_redundant_experts)
    return SimSetup(req.shape, lay, hw, wl)


@handles_errors
def cmd_simulate(args: argparse.Namespace) -> int:
    """Simulate one deployment, or run a sweep and write its plot and numbers."""
    setup = setup_from_args(args)
    lay, wl = setup.layout, setup.workload
    print(f"{setup.shape.name}: {lay.n_a}x{setup.hw.attn_gpu.name}/tp{lay.tp_a} attention, "
          f"{lay.n_e}x{setup.hw.expert_gpu.name}/tp{lay.tp_e} experts, m={lay.m}, b_a={wl.b_a}, "
          f"{wl.steps} steps, skew={args.skew}, seq-len cv={wl.seq_len_cv}")
    if args.sweep is None:
        row = describe(setup, run_setup(setup))
        print(json.dumps(row, indent=2))
        return 0
    return _run_sweep(args, setup)


def _run_sweep(args: argparse.Namespace, setup: SimSetup) -> int:
    from afdserve.simulator.plots import plot_sweep

    values = [float(v) for v in args.sweep_values.split(",")] if args.sweep_values else None
    shape, lay, hw = setup.shape, setup.layout, setup.hw
    c = math.ceil(shape.num_experts / lay.n_e)
    n_star = hw.attn.k1_s(setup.workload.avg_seq_len) * shape.num_experts / (hw.expert.k3_s_per_token * shape.top_k * c)
    if args.sweep == "m":
        rows = sweep_micro_batches(setup, tuple(int(v) for v in values or (1, 2, 3, 4)))
        marker = rows[0]["m_min"]
    elif args.sweep == "attn-groups":
        default = range(1, max(8, 2 * math.ceil(n_star)) + 1)
        rows = sweep_attn_groups(setup, tuple(int(v) for v in values or default))
        marker = n_star
    else:
        rows = sweep_skew(setup, tuple(values or (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)))
        marker = None
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"sweep_{args.sweep.replace('-', '_')}")
    suffix = f"{shape.name}, {hw.attn_gpu.name}/{hw.expert_gpu.name}, n*={n_star:.2f}"
    plot_sweep(args.sweep, rows, stem + ".png", suffix, marker)
    dump_json(stem + ".json", {"sweep": args.sweep, "model": shape.name, "attn_gpu": hw.attn_gpu.name,
                               "expert_gpu": hw.expert_gpu.name, "balance_n_a": n_star, "marker": marker,
                               "coeffs": {"attn": vars(hw.attn), "expert": vars(hw.expert)}, "rows": rows})
    for r in rows:
        x = {"m": r["m"], "attn-groups": r["n_a"]}.get(args.sweep, r.get("alpha"))
        print(f"  {args.sweep}={x}: normalised {r['normalised']:.3f}, step {r['step_time_s'] * 1e3:.1f} ms, "
              f"expert util {r['utilisation']['expert']:.3f}, bubble {r['bubble_frac']['expert']:.3f}")
    print(f"wrote {stem}.png and {stem}.json")
    return 0
