"""KV splits of ``afdserve.kernels.attention.decode_attention``: the automatic choice against
every fixed split count, CUDA-graph timed, where the benchmark shows it short of the goal.

    python3 benchmarks/tune_decode_splits.py --out DIR

Legend: B sequences, H query heads, G kv heads, Hd head dim, NB blocks, BS block size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from afdserve.kernels.attention import _num_splits  # noqa: E402
from benchmarks.gpu_kernels import MODELS, decode_cases  # noqa: E402
from benchmarks.gpu_timing import graph_ms  # noqa: E402

BATCHES, CONTEXTS, SPLITS = [1, 8, 32, 128], [2048, 8192], [1, 2, 4, 8, 16, 32, 64]


def sweep(name: str) -> list[dict]:
    g, hd = MODELS[name][5:]
    rows = []
    for s, b, run in decode_cases(name, BATCHES, CONTEXTS):
        times = {n: graph_ms(lambda: run(num_splits=n)) for n in SPLITS}  # noqa: B023
        auto = _num_splits(b, g, s, 64, torch.device("cuda"))
        best = min(times, key=times.get)
        gb = b * s * g * hd * 4 / 1e9
        rows.append({"model": name, "batch": b, "context": s, "auto_splits": auto, "auto_ms": graph_ms(run),
                     "best_splits": best, "best_ms": times[best], "gb": gb,
                     "all_ms": {str(n): v for n, v in times.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rows = [r for name in MODELS for r in sweep(name)]
    with open(os.path.join(args.out, "tune_decode_splits.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("model          batch context auto  auto_GB/s  best  best_GB/s")
    for r in rows:
        print(f"{r['model']:<14} {r['batch']:>5} {r['context']:>7} {r['auto_splits']:>4} "
              f"{r['gb'] / r['auto_ms'] * 1e3:>10.0f} {r['best_splits']:>5} {r['gb'] / r['best_ms'] * 1e3:>10.0f}")


if __name__ == "__main__":
    main()
