"""``afdserve plan``, ``afdserve simulate`` and ``afdserve profile``.

    afdserve plan --model Mixtral-8x22B --attn-gpu H20 --expert-gpu L40S --slo-ms 150 --avg-seq-len 730
    afdserve simulate --model Mixtral-8x22B --attn-gpu H20 --expert-gpu L40S --sweep m --out-dir sim
    afdserve profile --model /path/to/hf_model --gpu H20 --device cuda --out h20.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace

import numpy as np

from afdserve.planner.core import PlanRequest, SearchSpace
from afdserve.planner.hardware import GPU, get_gpu, load_catalog
from afdserve.planner.models import MoEShape, load_shape
from afdserve.planner.perf_model import Efficiency
from afdserve.planner.plan_file import write_plan
from afdserve.planner.profile import CoeffSource, load_profile
from afdserve.planner.report import search_report
from afdserve.planner.search import search
from afdserve.simulator.costs import zipf_expert_load


def register(subparsers) -> None:
    """Add the plan, simulate and profile sub-commands to an argparse subparsers object."""
    p = subparsers.add_parser("plan", help="search the best AFD deployment plan for a model and GPUs")
    add_model_args(p)
    p.add_argument("--top", type=int, default=10, help="plans to print")
    p.add_argument("--out", default="plan.json", help="plan file to write (the best plan)")
    p.set_defaults(func=cmd_plan)

    s = subparsers.add_parser("simulate", help="simulate the ping-pong pipeline of a deployment")
    add_model_args(s)
    from afdserve.planner.sim_cli import add_simulate_args, cmd_simulate

    add_simulate_args(s)
    s.set_defaults(func=cmd_simulate)

    f = subparsers.add_parser("profile", help="measure k1..k4 and the transport curve on this device")
    from afdserve.planner.measure_cli import add_profile_args, cmd_profile

    add_profile_args(f)
    f.set_defaults(func=cmd_profile)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by plan and simulate: model, GPUs, SLO, workload, coefficients."""
    p.add_argument("--model", required=True, help="preset name (e.g. Mixtral-8x22B) or a Hugging Face model directory")
    p.add_argument("--attn-gpu", default=None, help="GPU type(s) for attention, comma-separated, or 'any'")
    p.add_argument("--expert-gpu", default=None, help="GPU type(s) for experts, comma-separated, or 'any'")
    p.add_argument("--slo-ms", type=float, default=150.0, help="time-between-tokens SLO")
    p.add_argument("--avg-seq-len", type=float, default=730.0, help="average context length (tokens)")
    p.add_argument("--net-gb-per-s", type=float, default=None,
                   help="per-GPU link bandwidth, both roles (default: what a --profile measured on that GPU "
                        "type, else the catalog's)")
    p.add_argument("--attn-net-gb-per-s", type=float, default=None)
    p.add_argument("--expert-net-gb-per-s", type=float, default=None)
    p.add_argument("--gpu-file", default=None, help="JSON/TOML file adding GPUs or overriding prices")
    p.add_argument("--profile", action="append", default=[], help="profile file(s) from 'afdserve profile'")
    p.add_argument("--tp", default="1,2,4,8", help="tensor-parallel sizes to try, both roles")
    p.add_argument("--max-micro-batches", type=int, default=4)
    p.add_argument("--expert-groups-options", default=None,
                   help="n_e values to try (default: every n_e whose experts fit in memory)")
    p.add_argument("--mem-frac", type=float, default=0.9, help="share of GPU memory for weights + KV")
    p.add_argument("--mem-eff", type=float, default=Efficiency.mem, help="roofline: share of memory bandwidth")
    p.add_argument("--compute-eff", type=float, default=Efficiency.compute, help="roofline: share of bf16 peak")
    p.add_argument("--sample-ms", type=float, default=0.0, help="lm_head + sampling per step")
    p.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of the per-expert load (0: uniform)")
    p.add_argument("--expert-load", default=None,
                   help="JSON per-expert loads, [E] or [L][E] (or the runtime's {\"loads\": ...} file)")
    p.add_argument("--num-redundant-experts", type=int, default=0,
                   help="spare expert slots for copies of hot experts (placed as the runtime's EPLB does)")


def expert_load_from_args(args: argparse.Namespace, shape: MoEShape) -> np.ndarray | None:
    """Per-expert load of --expert-load (a list, or the runtime's saved-loads file) or --skew."""
    if args.expert_load:
        with open(args.expert_load) as f:
            data = json.load(f)
        return np.asarray(data["loads"] if isinstance(data, dict) else data, dtype=float)
    return zipf_expert_load(shape.num_experts, shape.top_k, args.skew) if args.skew else None


def _gpus(spec: str, catalog: dict[str, GPU], net: float | None, coeffs: CoeffSource) -> tuple[GPU, ...]:
    """The GPUs of a role; their link rate: ``net`` if given, else the one a profile measured on
    that GPU type, else the catalog's."""
    names = list(catalog) if spec.strip().lower() == "any" else [s.strip() for s in spec.split(",") if s.strip()]
    gpus = tuple(get_gpu(n, catalog) for n in names)
    return tuple(replace(g, net_gb_per_s=net or coeffs.link_gb_per_s(g) or g.net_gb_per_s) for g in gpus)


def request_from_args(args: argparse.Namespace, top: int = 10) -> PlanRequest:
    """The PlanRequest the shared options describe."""
    if not args.attn_gpu or not args.expert_gpu:
        raise ValueError("--attn-gpu and --expert-gpu are required (a catalog name, a list, or 'any')")
    catalog = load_catalog(args.gpu_file)
    shape = load_shape(args.model)
    eff = Efficiency(mem=args.mem_eff, compute=args.compute_eff)
    coeffs = CoeffSource(tuple(load_profile(p) for p in args.profile), eff)
    groups = (tuple(int(x) for x in args.expert_groups_options.split(","))
              if args.expert_groups_options else None)
    space = SearchSpace(tp_values=tuple(int(x) for x in args.tp.split(",")),
                        max_micro_batches=args.max_micro_batches, expert_groups=groups,
                        usable_mem_frac=args.mem_frac, top=top)
    return PlanRequest(shape, _gpus(args.attn_gpu, catalog, args.attn_net_gb_per_s or args.net_gb_per_s, coeffs),
                       _gpus(args.expert_gpu, catalog, args.expert_net_gb_per_s or args.net_gb_per_s, coeffs),
                       args.slo_ms / 1e3, args.avg_seq_len, coeffs, space, args.sample_ms / 1e3,
                       expert_load_from_args(args, shape), args.num_redundant_experts)


def request_inputs(req: PlanRequest) -> dict:
    """The inputs of a search, for the record in the plan file."""
    return {"slo_s": req.slo_s, "avg_seq_len": req.avg_seq_len, "sample_s": req.sample_s,
            "num_redundant_experts": req.num_redundant_experts,
            "expert_load": None if req.expert_load is None else np.asarray(req.expert_load).tolist(),
            "attn_gpus": [g.name for g in req.attn_gpus], "expert_gpus": [g.name for g in req.expert_gpus],
            "net_gb_per_s": {"attn": [g.net_gb_per_s for g in req.attn_gpus],
                             "expert": [g.net_gb_per_s for g in req.expert_gpus]},
            "usable_mem_frac": req.space.usable_mem_frac, "efficiency": asdict(req.coeffs.efficiency)}


def handles_errors(fn):
    """Print bad inputs (unknown GPU or model, bad file) as one line and exit with 2."""
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@handles_errors
def cmd_plan(args: argparse.Namespace) -> int:
    """Search plans, print the table, write the best plan file."""
    req = request_from_args(args, top=args.top)
    shape = req.shape
    print(f"model {shape.name}: {shape.total_params / 1e9:.1f}B params, L={shape.num_layers}, E={shape.num_experts}, "
          f"K={shape.top_k}, P_a={shape.attn_params_bytes / 1e9:.1f} GB, one expert={shape.expert_bytes / 1e9:.2f} GB, "
          f"KV/token/layer={shape.kv_bytes_per_token_layer} B")
    print(f"SLO {req.slo_s * 1e3:g} ms, avg seq len {req.avg_seq_len:g}; attention on "
          f"{','.join(g.name for g in req.attn_gpus)}, experts on {','.join(g.name for g in req.expert_gpus)}\n")
    t0 = time.perf_counter()
    res = search(req)
    print(search_report(res, time.perf_counter() - t0))
    runnable = res.plans[:1] + [p for p in res.baselines if p.layout == "colocated"][:1]  # TP-colocated: not ours
    if not runnable:
        return 1
    best = max(runnable, key=lambda p: p.tok_s_per_cost)
    write_plan(args.out, best, shape.name, request_inputs(req))
    print(f"\nwrote {os.path.abspath(args.out)}: the {best.layout} plan ({best.tok_s_per_cost:.1f} tok/s per cost; "
          "serve with the parallel options it holds)")
    return 0


def dump_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
