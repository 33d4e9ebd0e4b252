"""Dense projections of a small decode batch (q/k/v, o, router, lm_head of Qwen3-30B-A3B and
Mixtral-8x7B): cuBLAS (``torch.nn.functional.linear``) against the Triton grouped GEMM run as one
expert (``moe_gemm``, thin tiles), CUDA-graph timed, beside an elementwise kernel moving the
weight's bytes (the size-matched floor of ``small_batches.py``).

    python3 benchmarks/skinny_gemm.py --out DIR [--commit HASH]

Writes DIR/skinny_gemm.json (device, torch, commit, command) and prints a short table.
Legend: M tokens, N output features, K input features.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from afdserve.kernels.moe_gemm import moe_gemm  # noqa: E402
from benchmarks.gpu_timing import graph_ms, parse_run_args  # noqa: E402
from benchmarks.small_batches import copy_ms  # noqa: E402

# name: (N, K)
SHAPES = {"qwen3 qkv": (4096 + 2 * 512, 2048), "qwen3 o": (2048, 4096), "qwen3 router": (128, 2048),
          "qwen3 lm_head": (151936, 2048), "mixtral qkv": (4096 + 2 * 1024, 4096), "mixtral o": (4096, 4096)}
TOKENS = [1, 4, 10, 16, 32, 64]
TILES = [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, STAGES=s, num_warps=4)
         for n in (16, 32, 64) for k in (128, 256) for s in (3, 4)]


def main() -> None:
    args = parse_run_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    rows = []
    print(f"{'shape':<14} {'M':>4} {'MB':>7} {'cuBLAS us':>10} {'triton us':>10} {'floor us':>9}  best tile")
    for name, (n, k) in SHAPES.items():
        w_NK = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w_1NK = w_NK[None]
        for m in TOKENS:
            x_MK = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            counts = torch.tensor([m], dtype=torch.int32, device="cuda")
            want = F.linear(x_MK, w_NK).float()
            cublas = graph_ms(lambda: F.linear(x_MK, w_NK))  # noqa: B023
            tried = []
            for tile in TILES:
                try:
                    got = moe_gemm(x_MK, None, w_1NK, counts, gated=False, config=tile).float()
                except Exception as e:  # noqa: BLE001 (a tile that does not fit)
                    tried.append({"tile": tile, "error": str(e)[:100]})
                    continue
                ok = torch.allclose(got, want, atol=5e-2, rtol=2e-2)
                ms = graph_ms(lambda: moe_gemm(x_MK, None, w_1NK, counts, gated=False, config=tile)) \
                    if ok else None  # noqa: B023
                tried.append({"tile": tile, "ok": ok, "ms": ms})
            best = min((t for t in tried if t.get("ms")), key=lambda t: t["ms"])
            nbytes = n * k * 2
            floor = copy_ms(nbytes)
            rows.append({"shape": name, "n": n, "k": k, "m": m, "mb": nbytes / 1e6, "cublas_ms": cublas,
                         "triton_best_ms": best["ms"], "triton_best_tile": best["tile"], "floor_ms": floor,
                         "tiles": tried})
            print(f"{name:<14} {m:>4} {nbytes / 1e6:>7.1f} {cublas * 1e3:>10.1f} {best['ms'] * 1e3:>10.1f} "
                  f"{floor * 1e3:>9.1f}  {best['tile']['BLOCK_N']}x{best['tile']['BLOCK_K']} s{best['tile']['STAGES']}",
                  flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": args.commit, "command": " ".join(["python3"] + sys.argv), "rows": rows}
    with open(os.path.join(args.out, "skinny_gemm.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
