"""Where a step's time goes (torch.profiler), Qwen3-30B-A3B shapes (random weights), any number of layers.

For each concurrency: the host time of each phase of a synchronous decode step (schedule, prepare
the inputs, launch the forward, launch the logits, wait for the GPU, sample and update), the step
time synchronous and with async scheduling, the GPU time of a step (CUDA events around its
kernels), and from torch.profiler the GPU's busy fraction of synchronous steps (the union of
kernel and copy intervals) and kernel time by kind.
With ``--prefill`` also the prefill steps of the largest concurrency (tokens/s, kernel time by kind).
Run on the device: PYTHONPATH=. python3 benchmarks/profile_decode.py --layers 48 --concurrency 10,32"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from benchmarks.e2e_decode import QWEN3_30B_A3B

KINDS = {"attention": ("_decode_kernel", "_merge_kernel", "_prefill_kernel", "_write_kv", "_qkv"),
         "experts": ("_moe_gemm", "_combine", "_dispatch", "grouped", "_count", "_scan", "_scatter"),
         "router": ("_topk",), "norms": ("_rms", "_norm"),
         "gemm (qkv/o/lm_head/router)": ("gemm", "nvjet", "cutlass", "sm90"),
         "copies/fills": ("memcpy", "memset", "fill", "copy")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--concurrency", default="10")
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed per concurrency")
    ap.add_argument("--prefill", action="store_true", help="also profile the prefill of the largest concurrency")
    ap.add_argument("--enforce-eager", action="store_true", help="profile kernels one by one (no graphs)")
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    args = ap.parse_args()
    from afdserve import LLM

    concs = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(QWEN3_30B_A3B | {"num_hidden_layers": args.layers}, f)
        max_len = args.input_len + 4 * args.steps + 32  # every decode step below fits: none finishes early
        llm = LLM(d, load_format="dummy", device="cuda", dtype="bfloat16", max_num_seqs=max(concs),
                  max_num_batched_tokens=8192, max_model_len=max_len,
                  kv_cache_memory_gb=max(4, max(concs) * max_len * args.layers * 2048 / 2**30 * 1.1),
                  enforce_eager=args.enforce_eager)
    engine = llm.engine
    results = {"layers": args.layers, "input_len": args.input_len, "commit": os.environ.get("AFDSERVE_COMMIT"),
               "device": torch.cuda.get_device_name(), "torch": torch.__version__, "decode": []}
    for c in concs:
        add_requests(engine, c, args.input_len)
        if args.prefill and c == max(concs):
            results["prefill"] = profile_prefill(engine)
            print("prefill:", results["prefill"])
        while any(r.num_computed < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        for _ in range(3):
            engine.step()
        row = {"concurrency": c, **decode_phases(engine, args.steps), **profile_steps(engine, steps=5)}
        assert len(engine.scheduler.running) == c, "requests finished during the timed steps"
        results["decode"].append(row)
        print(json.dumps(row))
        for rid in list(engine.requests):
            engine.abort_request(rid)
    print(f"\n{'conc':>5} {'step ms':>8} {'sync ms':>8} {'GPU ms':>8} "
          f"{'sync host ms (sched/prep/launch/logits/wait/update)':>53}")
    for r in results["decode"]:
        ph = r["phases_ms"]
        print(f"{r['concurrency']:>5} {r['step_ms']:>8.2f} {r['sync_step_ms']:>8.2f} {r['gpu_span_ms']:>8.2f} "
              f"{'/'.join(f'{ph[k]:.2f}' for k in ph):>48}")
        if r["gpu_ms_by_kind"]:
            print(f"      profiler: GPU busy {r['gpu_busy_ms_per_step']:.2f} ms per step; by kind:",
                  r["gpu_ms_by_kind"])
        else:
            print("      profiler: no GPU activity recorded")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def add_requests(engine, n: int, input_len: int) -> None:
    from afdserve import SamplingParams
    gen = torch.Generator().manual_seed(n)
    for i in range(n):
        engine.add_request(f"{n}-{i}", torch.randint(0, 151000, (input_len,), generator=gen).tolist(),
                           SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True))


def decode_phases(engine, steps: int) -> dict:
    """Host time of each phase of a synchronous ``Engine.step`` (same calls, timed one by one),
    then the plain step time synchronous and with async scheduling."""
    from afdserve.runner import prepare, sample_logits
    engine._read_inflight()
    engine.async_scheduling = False
    names = ["schedule", "prepare", "launch forward", "launch logits", "wait GPU", "sample + update"]
    acc, gpu_s = [0.0] * len(names), 0.0
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t_start = time.perf_counter()
    for _ in range(steps):
        t = [time.perf_counter()]
        plan = engine.scheduler.schedule()
        t.append(time.perf_counter())
        inputs = [prepare(mb, engine.scheduler.block_size, engine.device) for mb in plan.micro_batches]
        t.append(time.perf_counter())
        first.record()
        hidden = engine.executor.run(inputs)
        t.append(time.perf_counter())
        logits = sample_logits(engine.attn, inputs, hidden)
        last.record()
        t.append(time.perf_counter())
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        engine.update(plan, logits)
        t.append(time.perf_counter())
        for i in range(len(names)):
            acc[i] += t[i + 1] - t[i]
        gpu_s += first.elapsed_time(last) / 1e3
    wall = time.perf_counter() - t_start
    plain = {}
    for mode in (False, True):
        engine.async_scheduling = mode
        engine.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        plain[mode] = time.perf_counter() - t0
    return {"step_ms": round(1e3 * plain[True] / steps, 3), "sync_step_ms": round(1e3 * plain[False] / steps, 3),
            "instrumented_step_ms": round(1e3 * wall / steps, 3),
            "gpu_span_ms": round(1e3 * gpu_s / steps, 3),  # first to last kernel of a step: its GPU time

            "phases_ms": {n: round(1e3 * a / steps, 3) for n, a in zip(names, acc)}}


def profile_steps(engine, steps: int) -> dict:
    """Kernel time by kind and the GPU's busy fraction of synchronous steps."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    engine._read_inflight()
    engine.async_scheduling = False
    engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy, by_kind = kernel_intervals(prof)
    return {"profiled_step_ms": round(1e3 * wall / steps, 3), "gpu_busy_fraction": round(busy / 1e6 / wall, 3),
            "gpu_busy_ms_per_step": round(busy / 1e3 / steps, 3),
            "gpu_ms_by_kind": {k: round(v / 1e3 / steps, 3) for k, v in by_kind.items()}}


def profile_prefill(engine) -> dict:
    """Prefill steps until every waiting prompt is in: tokens/s and kernel time by kind."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    tokens, steps = 0, 0
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        while engine.scheduler.waiting or any(r.num_computed < r.num_prompt_tokens for r in engine.scheduler.running):
            before = sum(r.num_computed for r in engine.scheduler.running)
            engine.step()
            tokens += sum(r.num_computed for r in engine.scheduler.running) - before
            steps += 1
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy, by_kind = kernel_intervals(prof)
    return {"tokens": tokens, "steps": steps, "tokens_per_s": round(tokens / wall), "gpu_busy_fraction":
            round(busy / 1e6 / wall, 3), "gpu_ms_by_kind": {k: round(v / 1e3, 2) for k, v in by_kind.items()}}


def kernel_intervals(prof) -> tuple[float, dict[str, float]]:
    """(union of GPU activity in µs, µs by kind) from the profiler's trace."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    spans, by_kind = [], {}
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset") or "dur" not in e:
            continue
        spans.append((e["ts"], e["ts"] + e["dur"]))
        name = e["name"].lower()
        kind = next((k for k, names in KINDS.items() if any(n in name for n in names)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e["dur"]
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy, dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    main()
