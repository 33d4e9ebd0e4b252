"""Timing helpers of the GPU benchmarks: eager (what the engine pays today, Python launch
overhead included) and CUDA-graph replay (the GPU's own time). Both are the median of
event-timed runs from ``triton.testing.do_bench``, which flushes L2 between runs."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from triton.testing import do_bench


def parse_run_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The flags every GPU benchmark takes (``--out`` folder, created; ``--commit``) beside the
    caller's own; seeds torch for repeatable random inputs."""
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    return args


def eager_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_ms(fn: Callable[[], object]) -> float:
    """Capture ``fn`` (after a warm-up that compiles its kernels) and time the replays."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = float(do_bench(graph.replay, warmup=25, rep=100, return_mode="median"))
    del graph
    return ms


def both_ms(fn: Callable[[], object]) -> tuple[float, float]:
    """(eager, graph) milliseconds."""
    return eager_ms(fn), graph_ms(fn)
