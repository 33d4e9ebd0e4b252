"""Issue 8 on CPU: the analogue of MegaScale-Infer's Fig. 15 (attention GPUs per expert GPU
against throughput per GPU) at Mixtral-8x7B shape on H200s, predicted from the profile measured
on 2xH200, because multi-GPU machines cannot be had now. A prediction, not a measurement.

- AFD: one expert GPU (tp 1) and n_a = 1..7 attention GPUs (tp 1), for m = 3 and for the best m
  in 1..4, at the largest per-micro-batch size b_a meeting the TBT SLO within the attention GPU's
  KV memory (eq. 8); tokens/s per GPU from the planner's closed form (``perf_model.step_time_s``)
  and from the simulator replaying the ping-pong schedule with the same costs (``build_costs``).
- Colocated expert-parallel (DP attention + EP) on the same G = n_a + 1 GPUs
  (``colocated.colocated_ep_plan``), its best batch under the same SLO.
- The measured 2-GPU points (``benchmarks/results/afd_*_2xH200_<in>_<out>.json``) beside them,
  with the same model's prediction at the measured batch.

T_c: the profile's utilisation curve is relative to its own ``comm.link_gb_per_s`` (the NVLink
peer-to-peer rate the transfer benchmark reached), so the H200's ``net_gb_per_s`` is set to that
rate; ``--catalog-link`` keeps the catalog's 50 GB/s (the planner CLI's behaviour).

    python benchmarks/scaling_sim.py    # writes benchmarks/results/scaling_sim_H200.{json,png,md}
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from afdserve.planner.colocated import colocated_ep_plan, colocated_ep_step_s  # noqa: E402
from afdserve.planner.core import Plan, PlanRequest, Rejection, SearchSpace  # noqa: E402
from afdserve.planner.hardware import get_gpu  # noqa: E402
from afdserve.planner.models import load_shape  # noqa: E402
from afdserve.planner.perf_model import (  # noqa: E402
    AfdLayout,
    Hardware,
    afd_stage_times_s,
    balanced_attn_groups,
    min_micro_batches,
    step_time_lower_bound_s,
    step_time_s,
)
from afdserve.planner.profile import CoeffSource, Profile, load_profile  # noqa: E402
from afdserve.planner.search import AttnSide, attn_sides_for, expert_sides_for, largest_true, search  # noqa: E402
from afdserve.simulator import Workload, build_costs, simulate  # noqa: E402
from benchmarks.scaling_sim_report import (  # noqa: E402
    markdown,
    measured_table,
    plot,
    summary_sentences,
    table,
    why_sentences,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
MODEL = "Mixtral-8x7B"
WORKLOADS = ((571, 159), (2048, 512))
GOAL = 1.5  # issue 8: AFD tokens/s per GPU against colocated on the same GPUs


def avg_context(input_len: int, output_len: int) -> float:
    """Mean context over a request's decode, as ``benchmarks/afd_e2e.py`` uses: input + output/2."""
    return input_len + output_len / 2


def make_request(profile: Profile, avg_seq_len: float, slo_s: float, max_m: int = 4, sample_s: float = 0.0,
                 profile_link: bool = True) -> PlanRequest:
    """Both roles on the profile's GPU at tp 1, one expert group, coefficients from the profile."""
    gpu, coeffs = get_gpu(profile.gpu), CoeffSource((profile,))
    if profile_link:  # as `afdserve plan --profile` does
        gpu = replace(gpu, net_gb_per_s=coeffs.link_gb_per_s(gpu) or gpu.net_gb_per_s)
    space = SearchSpace(tp_values=(1,), max_micro_batches=max_m, expert_groups=(1,), top=1)
    return PlanRequest(load_shape(MODEL), (gpu,), (gpu,), slo_s, avg_seq_len, coeffs, space, sample_s)


def afd_sides(req: PlanRequest) -> tuple[AttnSide, Hardware]:
    """The attention side (coefficients, KV capacity) and the hardware of the 1-expert-GPU layout."""
    rejections: list[Rejection] = []
    attn = next(attn_sides_for(req, rejections), None)
    expert = next(expert_sides_for(req, rejections), None)
    if attn is None or expert is None:
        raise ValueError("; ".join(r.reason for r in rejections))
    return attn, Hardware(attn.gpu, expert.gpu, attn.coeffs, expert.coeffs, req.coeffs.util_curve(),
                          req.coeffs.route(req.shape, attn.gpu))


def model_step_s(req: PlanRequest, lay: AfdLayout, hw: Hardware, b_a: float) -> float:
    """The planner's closed form of the pipelined step (exact for uniform costs) plus sampling."""
    t_a, t_e, t_c = afd_stage_times_s(req.shape, lay, hw, b_a, req.avg_seq_len)
    return step_time_s(t_a, t_e, t_c, lay.m, req.shape.num_layers) + req.sample_s


def sim_step_s(req: PlanRequest, lay: AfdLayout, hw: Hardware, b_a: float) -> float:
    """The simulator's replay of the schedule with the planner's costs (as ``search`` runs it)."""
    wl = Workload(b_a, req.avg_seq_len, sample_s=req.sample_s)
    return simulate(build_costs(req.shape, lay, hw, wl)).step_time_s


def afd_point(req: PlanRequest, attn: AttnSide, hw: Hardware, n_a: int, m: int) -> dict:
    """Largest b_a under the SLO and memory, by the model and by the simulator, and their throughput."""
    lay = AfdLayout(1, n_a, 1, 1, m)
    b_mem = attn.max_seqs // m
    b = largest_true(lambda b: model_step_s(req, lay, hw, b) <= req.slo_s, b_mem)
    b_sim = largest_true(lambda b: sim_step_s(req, lay, hw, b) <= req.slo_s, b_mem)
    per_gpu = lambda b, step: b * m * n_a / step / lay.num_gpus if b else 0.0  # noqa: E731
    out = {"m": m, "b_a_memory": b_mem, "b_a": b, "sim_b_a": b_sim, "limited_by": "memory" if b == b_mem else "slo"}
    step = model_step_s(req, lay, hw, b) if b else math.inf
    sim = sim_step_s(req, lay, hw, b_sim) if b_sim else math.inf
    out |= {"step_s": step, "tok_s_per_gpu": per_gpu(b, step), "sim_step_s": sim,
            "sim_tok_s_per_gpu": per_gpu(b_sim, sim), "sim_step_s_same_b": sim_step_s(req, lay, hw, b) if b else None}
    if b:
        t_a, t_e, t_c = afd_stage_times_s(req.shape, lay, hw, b, req.avg_seq_len)
        out |= {"t_a_s": t_a, "t_e_s": t_e, "t_c_s": t_c, "m_min": min_micro_batches(t_a, t_e, t_c),
                "eq5_step_s": step_time_lower_bound_s(t_a, t_e, t_c, m, req.shape.num_layers) + req.sample_s}
    return out


def colocated_point(req: PlanRequest, num_gpus: int) -> dict:
    """DP attention + EP on ``num_gpus`` GPUs: the planner's best batch under the SLO."""
    rejections: list[Rejection] = []
    p = colocated_ep_plan(req, req.attn_gpus[0], num_gpus, rejections)
    if p is None:
        return {"num_gpus": num_gpus, "b": 0, "tok_s_per_gpu": 0.0, "why": rejections[-1].reason}
    return {"num_gpus": num_gpus, "b": p.b_a, "step_s": p.step_s, "tok_s_per_gpu": p.tok_s_per_gpu,
            "t_a_s": p.t_a_s, "t_e_s": p.t_e_s, "t_c_s": p.t_c_s, "limited_by": p.limited_by}


def colocated_step_s(req: PlanRequest, n: int, b: float) -> float:
    """The step of ``colocated_ep_plan`` at a given batch per GPU (it only reports the SLO-best one)."""
    return colocated_ep_step_s(req, req.attn_gpus[0], n, b)


def sweep_row(req: PlanRequest, attn: AttnSide, hw: Hardware, n_a: int, ms: tuple[int, ...]) -> dict:
    """One n_a: AFD at every m, the best m (model and simulator), colocated on G = n_a + 1."""
    col = colocated_point(req, n_a + 1)
    afd = [afd_point(req, attn, hw, n_a, m) for m in ms]
    for p in afd:
        p["ratio_vs_colocated"] = p["tok_s_per_gpu"] / col["tok_s_per_gpu"] if col["tok_s_per_gpu"] else None
    best = max(afd, key=lambda p: p["tok_s_per_gpu"])
    best_sim = max(afd, key=lambda p: p["sim_tok_s_per_gpu"])
    return {"n_a": n_a, "num_gpus": n_a + 1, "afd": afd, "best_m": best["m"],
            "best_tok_s_per_gpu": best["tok_s_per_gpu"], "best_m_sim": best_sim["m"],
            "best_sim_tok_s_per_gpu": best_sim["sim_tok_s_per_gpu"], "colocated": col,
            "ratio_best": best["ratio_vs_colocated"]}


def sweep(req: PlanRequest, n_as: tuple[int, ...] = tuple(range(1, 8)),
          ms: tuple[int, ...] = (1, 2, 3, 4)) -> list[dict]:
    """The Fig. 15 analogue for one workload: a row per number of attention GPUs."""
    attn, hw = afd_sides(req)
    return [sweep_row(req, attn, hw, n_a, ms) for n_a in n_as]


# -- measured 2-GPU points ---------------------------------------------------------------------

def measured_points(req: PlanRequest, input_len: int, output_len: int, slo_ms: float) -> list[dict]:
    """Rows of ``afd_*_<in>_<out>.json`` (AFD 1+1 and colocated x2), with the model at their batch."""
    _, hw = afd_sides(req)
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, f"afd_*_{input_len}_{output_len}.json"))):
        with open(path) as f:
            d = json.load(f)
        for r in d["rows"]:
            if "error" in r or r.get("kind") not in ("afd", "colocated"):
                continue
            if r["kind"] == "afd":
                lay = AfdLayout(1, r["n_a"], 1, r["n_e"], r["m"])
                step = model_step_s(req, lay, hw, r["b"] / r["m"])
            else:
                step = colocated_step_s(req, r["n_a"], r["b"])
            out.append({"file": os.path.relpath(path, REPO), "commit": d.get("commit"), "layout": r["layout"],
                        "kind": r["kind"], "n_a": r["n_a"] if r["kind"] == "afd" else r["gpus"] - 1,
                        "m": r["m"], "transport": r.get("transport"), "gpus": r["gpus"], "b": r["b"],
                        "tok_s_per_gpu": r["tok_s_per_gpu"], "tbt_mean_ms": r["tbt_mean_ms"],
                        "meets_slo": r["tbt_mean_ms"] <= slo_ms, "model_step_ms_at_b": 1e3 * step,
                        "model_tok_s_per_gpu_at_b": r["total_batch"] / step / r["gpus"]})
    return out


def measured_route_s(input_len: int, output_len: int) -> dict | None:
    """The runtime's routing cost per layer and micro-batch by expert-group count, [s per token, s],
    as ``afd_e2e.py`` fitted it (its prediction adds it to T_a; the planner's model has no such term)."""
    for path in sorted(glob.glob(os.path.join(RESULTS, f"afd_e2e_*_{input_len}_{output_len}.json"))):
        with open(path) as f:
            route = json.load(f).get("profile", {}).get("route_s")
        if route:
            return route
    return None


# -- one workload ------------------------------------------------------------------------------

def run_workload(profile: Profile, input_len: int, output_len: int, args: argparse.Namespace) -> dict:
    ctx = avg_context(input_len, output_len)
    req = make_request(profile, ctx, args.slo_ms / 1e3, max(args.ms), args.sample_ms / 1e3, not args.catalog_link)
    rows = sweep(req, tuple(range(1, args.max_attn_gpus + 1)), tuple(args.ms))
    attn, hw = afd_sides(req)
    shape = req.shape
    # the paper's n* = k1·E/(k3·K) assumes one expert per group; one group holding all E: k1/(k3·K)
    n_star = balanced_attn_groups(hw.attn.k1_s(ctx), hw.expert.k3_s_per_token * shape.num_experts,
                                  shape.num_experts, shape.top_k)
    planned = search(replace(req, space=replace(req.space, max_attn_groups=args.max_attn_gpus)))
    best_afd = max(rows, key=lambda r: r["best_tok_s_per_gpu"])
    best_col = max(rows, key=lambda r: r["colocated"]["tok_s_per_gpu"])
    best_ratio = max(rows, key=lambda r: r["ratio_best"] or 0.0)
    return {
        "input_len": input_len, "output_len": output_len, "avg_seq_len": ctx, "slo_ms": args.slo_ms,
        "net_gb_per_s": hw.attn_gpu.net_gb_per_s, "attn_max_seqs": attn.max_seqs,
        "coeffs": {"attn": vars(hw.attn), "expert": vars(hw.expert), "k1_s": hw.attn.k1_s(ctx)},
        "balance_n_a": n_star, "rows": rows,
        "summary": {"best_afd": {"n_a": best_afd["n_a"], "m": best_afd["best_m"],
                                 "tok_s_per_gpu": best_afd["best_tok_s_per_gpu"]},
                    "best_colocated": {"num_gpus": best_col["num_gpus"], **best_col["colocated"]},
                    "best_ratio_same_g": {"n_a": best_ratio["n_a"], "m": best_ratio["best_m"],
                                          "ratio": best_ratio["ratio_best"]},
                    "best_afd_over_best_colocated":
                        best_afd["best_tok_s_per_gpu"] / best_col["colocated"]["tok_s_per_gpu"],
                    "goal_met": (best_ratio["ratio_best"] or 0.0) >= GOAL},
        "planner_search_best": _plan_summary(planned.plans[0]) if planned.plans else None,
        "measured_2gpu": measured_points(req, input_len, output_len, args.slo_ms),
        "measured_route_s": measured_route_s(input_len, output_len),
    }


def _plan_summary(p: Plan) -> dict:
    return {"n_a": p.n_a, "m": p.m, "b_a": p.b_a, "step_s": p.step_s, "tok_s_per_gpu": p.tok_s_per_gpu}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=os.path.join(RESULTS, "profile_2xH200.json"))
    ap.add_argument("--slo-ms", type=float, default=150.0)
    ap.add_argument("--max-attn-gpus", type=int, default=7)
    ap.add_argument("--ms", default="1,2,3,4", help="micro-batch counts to try")
    ap.add_argument("--sample-ms", type=float, default=0.0, help="lm_head + sampling per step (planner default 0)")
    ap.add_argument("--catalog-link", action="store_true", help="T_c at the catalog's net_gb_per_s, not the profile's")
    ap.add_argument("--out", default=os.path.join(RESULTS, "scaling_sim_H200"), help="path stem of .json/.png/.md")
    args = ap.parse_args()
    args.ms = [int(x) for x in args.ms.split(",")]
    profile = load_profile(args.profile)
    result = {"device": "CPU (model only)", "profile": os.path.relpath(os.path.abspath(args.profile), REPO),
              "commit": git_commit(), "command": " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
              "model": MODEL, "gpu": profile.gpu, "goal": GOAL, "out": os.path.relpath(os.path.abspath(args.out), REPO),
              "layout": "AFD: n_a attention GPUs (tp 1) + 1 expert GPU (tp 1) holding all experts; colocated: DP "
                        "attention + EP, one process per GPU",
              "workloads": [run_workload(profile, i, o, args) for i, o in WORKLOADS]}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    plot(result, args.out + ".png")
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    for wl in result["workloads"]:
        print(table(wl))
        print(measured_table(wl))
        print()
    print("\n".join(summary_sentences(result) + why_sentences(result)))
    print(f"wrote {args.out}.json, .png and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

