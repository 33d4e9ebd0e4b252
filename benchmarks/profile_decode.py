"""Where a decode step's time goes (torch.profiler), Qwen3-30B-A3B shapes with fewer layers.
Run on the device: PYTHONPATH=. python3 benchmarks/profile_decode.py --layers 8 --concurrency 10"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from benchmarks.e2e_decode import QWEN3_30B_A3B


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--enforce-eager", action="store_true", help="profile kernels one by one (no graphs)")
    args = ap.parse_args()
    from afdserve import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(QWEN3_30B_A3B | {"num_hidden_layers": args.layers}, f)
        llm = LLM(d, load_format="dummy", device="cuda", dtype="bfloat16", max_num_seqs=args.concurrency,
                  max_num_batched_tokens=8192, max_model_len=args.input_len + 64, kv_cache_memory_gb=4,
                  enforce_eager=args.enforce_eager)
    engine = llm.engine
    gen = torch.Generator().manual_seed(0)
    for i in range(args.concurrency):
        engine.add_request(str(i), torch.randint(0, 151000, (args.input_len,), generator=gen).tolist(),
                           SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    steps = []
    for _ in range(12):  # prefill, then decode
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    print("step ms:", [round(1e3 * s, 1) for s in steps])
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    print("GPU time per decode step by kind (ms):", gpu_time_by_kind(prof, steps=3))


def gpu_time_by_kind(prof, steps: int) -> dict[str, float]:
    """Kernel time per step, grouped by what the kernel does (names of our Triton kernels and aten ops)."""
    kinds = {"attention": ("_decode_kernel", "_merge_kernel", "_prefill_kernel", "_write_kv"),
             "experts": ("_moe_gemm", "_combine", "_dispatch", "grouped", "_count"),
             "router": ("_topk", "fused_topk"), "gemm (qkv/o/lm_head/router)": ("gemm", "nvjet", "cutlass", "sm90")}
    out: dict[str, float] = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
        if t <= 0 or e.key.startswith("aten::") or e.key.startswith("cuda"):
            continue
        kind = next((k for k, names in kinds.items() if any(n.lower() in e.key.lower() for n in names)), "other")
        out[kind] = out.get(kind, 0.0) + t / 1e3 / steps
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    main()
