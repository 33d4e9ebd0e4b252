"""GPU kernel benchmark: ceilings, expert FFN sweep, paged decode attention sweep, fitted costs.

    python3 benchmarks/gpu_kernels.py --out DIR [--commit HASH] [--context 2048]

Writes DIR/gpu_kernels.json (every point, the ceilings, the fits, device/torch/commit/command)
and DIR/profile_<gpu>.json (the fitted constants, through ``afdserve.planner.profile``), then
prints a short table. One run takes a few minutes on an H100. Goals (reported, not asserted):
expert GEMMs >= 80% of the copy ceiling where memory-bound and >= 70% of the matmul ceiling
where compute-bound; decode attention >= 75% of the copy ceiling at context >= 2k.
Legend: T tokens, D hidden, E experts, K top-k, F = 2I, I intermediate, B sequences, G kv heads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from afdserve.kernels.attention import decode_attention  # noqa: E402
from afdserve.kernels.experts import GROUPED_MM_MIN_ROWS_PER_EXPERT, fused_experts  # noqa: E402
from afdserve.layers.attention import AttnMeta, add_device_fields  # noqa: E402
from benchmarks.gpu_timing import both_ms, eager_ms, parse_run_args  # noqa: E402

# name: (D, I, E, K, query heads, kv heads, head dim)
MODELS = {"Mixtral-8x7B": (4096, 14336, 8, 2, 32, 8, 128), "Qwen3-30B-A3B": (2048, 768, 128, 8, 32, 4, 128)}
TOKENS = [2 ** i for i in range(13)]  # routed tokens per layer, 1..4096
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
CONTEXTS = [256, 512, 1024, 2048, 4096, 8192]
BLOCK = 16
GOALS = {"memory": 0.80, "compute": 0.70, "attention": 0.75}


def ceilings() -> dict:
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() * 2 / eager_ms(lambda: dst.copy_(src)) / 1e6
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_tflops = 2 * 8192 ** 3 / eager_ms(lambda: a @ b) / 1e9
    return {"copy_gbps": copy_gbps, "matmul_tflops": mm_tflops}


def roofline(flops: float, nbytes: float, ms: float, ceil: dict) -> dict:
    """Achieved rates and the fraction of the binding ceiling (memory or compute)."""
    t_mem, t_cmp = nbytes / ceil["copy_gbps"] / 1e6, flops / ceil["matmul_tflops"] / 1e9
    bound = "compute" if t_cmp > t_mem else "memory"
    frac = (t_cmp if bound == "compute" else t_mem) / ms
    return {"ms": ms, "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6, "bound": bound,
            "frac_of_ceiling": frac, "meets_goal": frac >= GOALS[bound]}


def expert_weights(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 expert weights at the model's shape: w13 [E, 2I, D], w2 [E, D, I]."""
    d, i, e, _ = MODELS[name][:4]
    return (torch.randn(e, 2 * i, d, device="cuda", dtype=torch.bfloat16) * 0.02,
            torch.randn(e, d, i, device="cuda", dtype=torch.bfloat16) * 0.02)


def expert_inputs(name: str, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``t`` random tokens [T, D], a uniformly random routing [T, K] and its weights [T, K]."""
    d, _, e, k = MODELS[name][:4]
    return (torch.randn(t, d, device="cuda", dtype=torch.bfloat16),
            torch.rand(t, e, device="cuda").topk(k, dim=-1).indices, torch.rand(t, k, device="cuda"))


def expert_sweep(name: str, ceil: dict) -> list[dict]:
    d, i, e, k = MODELS[name][:4]
    w13_EFD, w2_EDI = expert_weights(name)
    rows = []
    for t in TOKENS:
        x_TD, ids_TK, w_TK = expert_inputs(name, t)
        active = int(ids_TK.unique().numel())
        flops = 2 * t * k * 3 * d * i
        nbytes = active * 3 * d * i * 2 + 2 * t * d * 2  # active experts' weights, x in, y out
        auto = "grouped_mm" if t * k / e >= GROUPED_MM_MIN_ROWS_PER_EXPERT else "triton"
        for impl in ("triton", "grouped_mm"):
            eager, ms = both_ms(lambda: fused_experts(x_TD, ids_TK, w_TK, w13_EFD, w2_EDI, impl=impl))  # noqa: B023
            rows.append({"model": name, "impl": impl, "auto_picks": impl == auto, "tokens": t, "b_e": t * k / e,
                         "active_experts": active, "eager_ms": eager, **roofline(flops, nbytes, ms, ceil)})
    return rows


def decode_cases(name: str, batches: list[int], contexts: list[int], device: str = "cuda"):
    """The decode-attention inputs of the sweeps: one random bf16 paged KV cache at the model's
    attention shape, and per (context s, batch b) a query and metadata over random blocks.
    Yields (s, b, run) with run(**kw) = decode_attention(...) of that case (kw: num_splits, config)."""
    heads, g, hd = MODELS[name][4:]
    nb = max(batches) * max(contexts) // BLOCK
    k_cache = torch.randn(nb, BLOCK, g, hd, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    for s in contexts:
        for b in batches:
            tables = torch.randperm(nb, device=device)[:b * s // BLOCK].view(b, -1).tolist()
            meta = AttnMeta(torch.zeros(b), torch.zeros(b), [1] * b, [s] * b, tables)
            add_device_fields(meta, device)
            q = torch.randn(b, heads, hd, device=device, dtype=torch.bfloat16)
            yield s, b, lambda q=q, meta=meta, s=s, **kw: decode_attention(
                q, k_cache, v_cache, meta.block_tables_BM, meta.ctx_lens_B, hd ** -0.5, s, **kw)


def attention_sweep(name: str, ceil: dict) -> list[dict]:
    heads, g, hd = MODELS[name][4:]
    rows = []
    for s, b, run in decode_cases(name, BATCHES, CONTEXTS):
        eager, ms = both_ms(run)
        nbytes = b * s * g * hd * 2 * 2 + 2 * b * heads * hd * 2 + b * (s // BLOCK) * 4
        gbps = nbytes / ms / 1e6
        frac = gbps / ceil["copy_gbps"]
        rows.append({"model": name, "heads": heads, "kv_heads": g, "batch": b, "context": s, "ms": ms,
                     "eager_ms": eager, "gbps": gbps, "frac_of_copy": frac,
                     "meets_goal": s < 2048 or frac >= GOALS["attention"]})
    return rows


def fit_line(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least squares y = a*x + c; also the largest relative residual."""
    a, c = np.polyfit(np.array(x, dtype=float), np.array(y, dtype=float), 1)
    worst = max(abs(a * xi + c - yi) / yi for xi, yi in zip(x, y))
    return float(a), float(c), float(worst)


def fits(experts: list[dict], attn: list[dict], context: int) -> dict:
    """T_e = k3*b_e + k4 on the impl that impl="auto" picks, points with every expert busy (b_e >= 4);
    T_a = k1*b_a + k2 for each context. Seconds of CUDA-graph time (the GPU's own); the
    eager-minus-graph median is the Python launch overhead the engine pays without graphs."""
    out = {}
    for name, (_, _, e, _, *_) in MODELS.items():
        picked = {r["tokens"]: r for r in experts if r["model"] == name and r["auto_picks"]}
        busy = [r for r in picked.values() if r["b_e"] >= 4]
        k3, k4, res_e = fit_line([r["b_e"] for r in busy], [r["ms"] / 1e3 for r in busy])
        k3_eager, k4_eager, _ = fit_line([r["b_e"] for r in busy], [r["eager_ms"] / 1e3 for r in busy])
        per_ctx = {}
        for s in CONTEXTS:
            pts = [r for r in attn if r["model"] == name and r["context"] == s]
            k1, k2, res_a = fit_line([r["batch"] for r in pts], [r["ms"] / 1e3 for r in pts])
            per_ctx[s] = {"k1_s_per_token": k1, "k2_s": k2, "max_rel_residual": res_a}
        k1_ctx = np.polyfit([float(s) for s in CONTEXTS], [per_ctx[s]["k1_s_per_token"] for s in CONTEXTS], 1)
        overhead = (picked[1]["eager_ms"] - picked[1]["ms"]) / 1e3  # one token: the launches are not hidden
        out[name] = {"k1_s_per_token": per_ctx[context]["k1_s_per_token"], "k2_s": per_ctx[context]["k2_s"],
                     "k3_s_per_token": k3, "k4_s": k4, "context": context, "experts": e,
                     "expert_fit_max_rel_residual": res_e, "expert_eager_minus_graph_1_token_s": overhead,
                     "eager_k3_s_per_token": k3_eager, "eager_k4_s": k4_eager, "attn_by_context": per_ctx,
                     "attn_k1_per_ctx_token": float(k1_ctx[0]), "attn_k1_at_ctx0": float(k1_ctx[1])}
    return out


def catalog_gpu(device: str) -> str:
    """The planner catalog's name for a torch device name ("NVIDIA H100 80GB HBM3" -> "H100")."""
    return next((g for g in ("H200", "H100", "H800", "H20", "A100-80GB", "L40S", "B200") if g in device), device)


def write_profile(path: str, device: str, fitted: dict, meta: dict) -> str:
    """Through ``afdserve.planner.profile`` when it imports, else the plain JSON of the brief."""
    gpu = catalog_gpu(device)
    try:
        from afdserve.planner.perf_model import AttnCoeffs, ExpertCoeffs
        from afdserve.planner.profile import Profile, save_profile
    except ImportError:
        with open(path, "w") as f:
            json.dump({"device": device, "models": fitted}, f, indent=2)
        return "plain JSON"
    attn = {n: {1: AttnCoeffs(max(f["attn_k1_at_ctx0"], 0.0), max(f["attn_k1_per_ctx_token"], 0.0), f["k2_s"],
                              "profile")} for n, f in fitted.items()}
    # one expert group holding all E experts: T_e = k3*b_e + k4 = (k3/E)*pairs + (k4/E)*E
    expert = {n: {1: ExpertCoeffs(f["k3_s_per_token"] / f["experts"], max(f["k4_s"], 0.0) / f["experts"], 0.0,
                                  "profile")} for n, f in fitted.items()}
    save_profile(path, Profile(device, gpu, "bfloat16", attn, expert, meta=meta))
    return "afdserve.planner.profile"


def table(ceil: dict, experts: list[dict], attn: list[dict], fitted: dict) -> str:
    lines = [f"ceilings: copy {ceil['copy_gbps']:.0f} GB/s, bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s",
             "expert FFN (ms: CUDA graph; eager: Python launches included)",
             "  model          tokens  impl (*auto) ms      eager    TFLOP/s  GB/s   bound    frac  goal"]
    for r in experts:
        impl = r["impl"] + ("*" if r["auto_picks"] else "")
        lines.append(f"  {r['model']:<14} {r['tokens']:>6}  {impl:<11} {r['ms']:>7.3f} {r['eager_ms']:>7.3f} "
                     f"{r['tflops']:>8.1f} {r['gbps']:>6.0f}  {r['bound']:<7} {r['frac_of_ceiling']:>5.2f} "
                     f"{'ok' if r['meets_goal'] else 'MISS'}")
    for name in MODELS:
        lines.append(f"decode attention {name} (CUDA graph): fraction of copy ceiling (rows batch, cols context)")
        lines.append("  batch " + " ".join(f"{s:>6}" for s in CONTEXTS))
        for b in BATCHES:
            fr = {r["context"]: r["frac_of_copy"] for r in attn if r["model"] == name and r["batch"] == b}
            lines.append(f"  {b:>5} " + " ".join(f"{fr[s]:>6.2f}" for s in CONTEXTS))
    for name, f in fitted.items():
        lines.append(f"fit {name}: T_e = {f['k3_s_per_token']:.3e}*b_e + {f['k4_s']:.3e} s "
                     f"(max resid {f['expert_fit_max_rel_residual']:.0%}; eager at 1 token +"
                     f"{f['expert_eager_minus_graph_1_token_s'] * 1e6:.0f} us); T_a(ctx {f['context']}) = "
                     f"{f['k1_s_per_token']:.3e}*b_a + {f['k2_s']:.3e} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=2048, help="context of the T_a fit written to the profile")
    args = parse_run_args(ap)
    device = torch.cuda.get_device_name()
    ceil = ceilings()
    experts = [r for name in MODELS for r in expert_sweep(name, ceil)]
    torch.cuda.empty_cache()
    attn = [r for name in MODELS for r in attention_sweep(name, ceil)]
    fitted = fits(experts, attn, args.context)
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "commit": args.commit,
            "command": " ".join(["python3"] + sys.argv),
            "scope": "T_a: the paged decode attention kernel alone (no projections); T_e: the whole "
                     "expert FFN (dispatch, grouped GEMMs, combine), one GPU holding all experts"}
    result = {**meta, "ceilings": ceil, "goals": GOALS, "experts": experts, "attention": attn, "fits": fitted}
    with open(os.path.join(args.out, "gpu_kernels.json"), "w") as f:
        json.dump(result, f, indent=1)
    how = write_profile(os.path.join(args.out, f"profile_{catalog_gpu(device).lower()}.json"), device, fitted, meta)
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, commit {args.commit}; profile via {how}")
    print(table(ceil, experts, attn, fitted))


if __name__ == "__main__":
    main()
