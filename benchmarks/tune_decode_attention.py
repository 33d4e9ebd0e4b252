"""Tile shapes of ``afdserve.kernels.attention.decode_attention`` where the kernel benchmark
shows it short of the goal (small batches): keys per iteration, pipeline stages, warps and
KV splits, CUDA-graph timed, each checked against the default tile's output.

    python3 benchmarks/tune_decode_attention.py --out DIR

Legend: B sequences, H query heads, G kv heads, Hd head dim, NB blocks, BS block size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from afdserve.kernels.attention import _num_splits  # noqa: E402
from benchmarks.gpu_kernels import MODELS, ceilings, decode_cases  # noqa: E402
from benchmarks.gpu_timing import graph_ms  # noqa: E402

BATCHES, CONTEXTS = [1, 8, 16, 32, 64], [2048, 4096]
TILES = [dict(BLOCK_N=n, STAGES=s, num_warps=w) for n, s, w in itertools.product((32, 64, 128), (2, 3, 4), (4, 8))]
SPLIT_SCALES = (1, 2)


def sweep(name: str, copy_gb_s: float) -> list[dict]:
    g, hd = MODELS[name][5:]
    rows = []
    for s, b, run in decode_cases(name, BATCHES, CONTEXTS):
        want = run()
        gb = b * s * g * hd * 4 / 1e9
        default_ms = graph_ms(run)
        times = []
        for tile in TILES:
            auto = _num_splits(b, g, s, tile["BLOCK_N"], torch.device("cuda"))
            for splits in sorted({max(1, min(64, round(auto * x))) for x in SPLIT_SCALES}):
                try:
                    got = run(num_splits=splits, config=tile)
                except Exception as e:  # noqa: BLE001 (a tile that does not fit the shared memory)
                    times.append({"tile": tile, "splits": splits, "error": str(e)[:120]})
                    continue
                ok = torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)
                times.append({"tile": tile, "splits": splits, "ok": ok,
                              "ms": graph_ms(lambda: run(num_splits=splits, config=tile))  # noqa: B023
                              if ok else None})
        best = min((t for t in times if t.get("ms")), key=lambda t: t["ms"])
        rows.append({"model": name, "batch": b, "context": s, "gb": gb, "default_ms": default_ms,
                     "default_frac": gb / default_ms * 1e3 / copy_gb_s, "best": best,
                     "best_frac": gb / best["ms"] * 1e3 / copy_gb_s, "all": times})
        print(f"{name:<14} {b:>5} {s:>7} {rows[-1]['default_frac']:>8.2f} {rows[-1]['best_frac']:>8.2f}  "
              f"{best['tile']} splits {best['splits']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    ceil = ceilings()
    print(f"copy ceiling {ceil['copy_gbps']:.0f} GB/s")
    print("model          batch context  default     best  best tile")
    rows = [r for name in args.models.split(",") for r in sweep(name, ceil["copy_gbps"])]
    with open(os.path.join(args.out, "tune_decode_attention.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": os.environ.get("AFDSERVE_COMMIT", "unknown"), "ceilings": ceil,
                   "command": "python3 benchmarks/tune_decode_attention.py --out DIR", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
