"""Tile shapes of ``afdserve.kernels.moe_gemm`` at the expert shapes of gpu_kernels.py:
each candidate timed (CUDA graph) on each GEMM and token count; the best per point printed.

    python3 benchmarks/tune_moe_gemm.py --out DIR

Legend: T tokens, D hidden, E experts, K top-k, F = 2I, I intermediate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from afdserve.kernels.dispatch import dispatch_rows  # noqa: E402
from afdserve.kernels.moe_gemm import _config, moe_gemm  # noqa: E402
from benchmarks.gpu_kernels import MODELS, expert_inputs, expert_weights  # noqa: E402
from benchmarks.gpu_timing import graph_ms  # noqa: E402

TOKENS = [1, 4, 16, 64, 256, 512, 1024, 2048, 4096]
# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES, num_warps)
CANDIDATES = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 64, 4, 4),
              (64, 128, 64, 4, 4), (64, 128, 64, 3, 8), (128, 128, 64, 3, 8), (128, 256, 64, 3, 8),
              # thin tiles for a few routed rows per expert (decode of a many-expert model)
              (16, 16, 256, 4, 4), (16, 32, 256, 3, 4), (16, 32, 64, 6, 4), (16, 64, 256, 3, 8), (16, 128, 128, 4, 8)]


def as_config(c: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "STAGES", "num_warps"), c))


def safe_ms(fn) -> float:
    """Graph time, or infinity where the tile does not fit (shared memory, registers)."""
    try:
        return graph_ms(fn)
    except Exception as exc:  # noqa: BLE001 - triton's OutOfResources and compile errors
        print(f"  skipped: {type(exc).__name__}: {str(exc)[:80]}")
        return float("inf")


def tune(name: str, tokens: list[int]) -> list[dict]:
    d, i, e, k = MODELS[name][:4]
    w13_EFD, w2_EDI = expert_weights(name)
    rows = []
    for t in tokens:
        x_TD, ids_TK, _ = expert_inputs(name, t)
        disp = dispatch_rows(ids_TK, e)
        act_NI = moe_gemm(x_TD, disp.src_N, w13_EFD, disp.counts_E, gated=True)
        gemms = {"w13": lambda cfg: moe_gemm(x_TD, disp.src_N, w13_EFD, disp.counts_E, True, cfg),  # noqa: B023
                 "w2": lambda cfg: moe_gemm(act_NI, None, w2_EDI, disp.counts_E, False, cfg)}  # noqa: B023
        for gemm, fn in gemms.items():
            n = i if gemm == "w13" else d
            default = _config(t * k, e, n, gemm == "w13")
            times = {c: safe_ms(lambda: fn(as_config(c))) for c in CANDIDATES}  # noqa: B023
            best = min(times, key=times.get)
            rows.append({"model": name, "tokens": t, "gemm": gemm, "best": best, "best_ms": times[best],
                         "default": default, "default_ms": graph_ms(lambda: fn(default)),  # noqa: B023
                         "all_ms": {str(c): v for c, v in times.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = [r for name in args.models.split(",") for r in tune(name, tokens)]
    with open(os.path.join(args.out, "tune_moe_gemm.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("model          tokens gemm  best (BM,BN,BK,S,W)      best_ms  default_ms")
    for r in rows:
        print(f"{r['model']:<14} {r['tokens']:>6} {r['gemm']:<4}  {str(r['best']):<24} {r['best_ms']:.4f}   "
              f"{r['default_ms']:.4f}")


if __name__ == "__main__":
    main()
