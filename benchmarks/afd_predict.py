"""The planner's prediction beside ``benchmarks/afd_e2e.py``'s measurements: coefficients
fitted on this GPU (``planner.measure``), written as a planner profile, and the model's step time
at a measured row's layout and batch, with T_c from the run's transfer benchmark."""

from __future__ import annotations

import math

import torch

from benchmarks import transfer


def dtype_name(device: str) -> str:
    return "bfloat16" if device.startswith("cuda") else "float32"


def fit_profile(shape, device, max_pairs: int, batches: tuple[int, ...], seq_lens: tuple[int, ...]) -> dict:
    """k1..k4 of the Mixtral shape on this GPU (``planner.measure``), the cost of the row split by
    expert group (``planner.measure.measure_route``) and the lm_head + argmax cost per step, each
    fitted linear in b."""
    import numpy as np

    from afdserve.planner.measure import fit_nonneg, measure_attn, measure_expert, measure_route, median_time_s

    dtype = getattr(torch, dtype_name(device.type))
    attn, attn_samples = measure_attn(shape, 1, batches, seq_lens, device, dtype)
    pairs = tuple(sorted({64, 256, 1024, 2048, max_pairs}))
    expert, expert_samples = measure_expert(shape, 1, pairs, device, dtype, held_counts=(4, 8))
    route, _ = measure_route(shape, (1, 2), batches, device, dtype, iters=5)
    samples = [(b, median_time_s(_sample_runner(shape, b, device, dtype), device, iters=5)) for b in batches]
    sample = [float(c) for c in fit_nonneg(np.array([[b, 1.0] for b, _ in samples]), np.array([t for _, t in samples]))]
    return {"attn": attn, "expert": expert, "route": route, "sample": sample,
            "samples": {"attn": attn_samples, "expert": expert_samples}}


def _sample_runner(shape, b, device, dtype):
    h = torch.randn(b, shape.hidden, device=device, dtype=dtype)
    w = torch.randn(shape.vocab, shape.hidden, device=device, dtype=dtype)
    return lambda: torch.argmax((h @ w.t()).float(), dim=-1).cpu()


def write_profile(path: str, prof: dict, comm: list[dict], device: str, model: str = "Mixtral-8x7B") -> None:
    """The fitted coefficients and the transport's utilisation curve as a planner profile file
    (``afdserve plan --profile PATH``)."""
    from afdserve.planner.measure_cli import guess_gpu
    from afdserve.planner.profile import Profile, save_profile

    curve, best = transfer.utilisation_curve(comm)
    gpu = guess_gpu(device) or device
    save_profile(path, Profile(device, gpu, "bfloat16", {model: {1: prof["attn"]}}, {model: {1: prof["expert"]}},
                               tuple((b, u) for b, u in curve), best, "nccl" if "cpu" not in device else "gloo",
                               {"source": "benchmarks/afd_e2e.py", "transport": "afdserve_p2p"},
                               {model: prof["route"]}))


def predict(row: dict, shape, prof: dict, comm: list[dict], ctx: float) -> dict:
    """The planner's model at this row's layout and batch: step time of the executor."""
    from afdserve.planner.perf_model import attn_time_s, expert_time_s, group_hit_prob, step_time_s

    L, K, E = shape.num_layers, shape.top_k, shape.num_experts
    row_bytes = shape.hidden * shape.dtype_bytes + 8 * K
    split_s = (lambda tokens: 0.0) if row["kind"] == "single" else (  # noqa: E731
        lambda tokens: prof["route"].time_s(tokens, row["n_e"]))
    s0, s1 = prof["sample"]
    b, m = row["b"], row["m"]
    if row["kind"] == "afd":
        bm = b / m
        held = math.ceil(E / row["n_e"])
        t_a = attn_time_s(bm, ctx, prof["attn"]) + split_s(bm)
        t_e = expert_time_s(bm * row["n_a"] * K * held / E, held, prof["expert"])
        rows_out = bm * group_hit_prob(E, K, held)
        # the busier end: an attention GPU sends its rows, an expert GPU receives every group's
        method = "afdserve_ipc" if row.get("transport") == "ipc" else "afdserve_p2p"
        t_c = max(comm_time_s(comm, method, rows_out * row_bytes),
                  comm_time_s(comm, method, row["n_a"] * rows_out * row_bytes))
        step = step_time_s(t_a, t_e, t_c, m, L)
    elif row["kind"] == "colocated":
        held = E // row["n_e"]
        t_a = attn_time_s(b, ctx, prof["attn"]) + split_s(b)
        t_e = expert_time_s(b * K, held, prof["expert"])  # b*n*K*held/E with held = E/n
        t_c = comm_time_s(comm, "afdserve_a2a", b * group_hit_prob(E, K, held) * row_bytes)
        step = L * (t_a + t_e + 2 * t_c)
    else:
        t_a = attn_time_s(b, ctx, prof["attn"])
        t_e = expert_time_s(b * K, E, prof["expert"])
        t_c = 0.0
        step = L * (t_a + t_e)
    return {"pred_step_ms": 1e3 * step, "pred_tbt_ms": 1e3 * (step + s0 * b + s1), "pred_t_a_ms": 1e3 * t_a,
            "pred_t_e_ms": 1e3 * t_e, "pred_t_c_ms": 1e3 * t_c}


def comm_time_s(comm: list[dict], method: str, nbytes: float) -> float:
    """One-way time of ``method`` at ``nbytes``, linear between the measured sizes."""
    pts = sorted((r["bytes"], r["median_us"] * 1e-6) for r in comm if r["method"] == method)
    if not pts or nbytes <= 0:
        return 0.0
    if nbytes <= pts[0][0]:
        return pts[0][1]
    for (x0, t0), (x1, t1) in zip(pts, pts[1:]):
        if nbytes <= x1:
            return t0 + (t1 - t0) * (nbytes - x0) / (x1 - x0)
    (x0, t0), (x1, t1) = pts[-2], pts[-1]
    return t1 + (t1 - t0) * (nbytes - x1) / (x1 - x0)
