"""End-to-end colocated decode on one GPU (issue 6): Qwen3-30B-A3B at real shapes with random
weights made on the GPU (``load_format="dummy"``), our engine against Hugging Face
transformers' ``generate`` on the same GPU.

For each concurrency c: c requests of ``--input-len`` random tokens, ``--output-len`` new
tokens each (EOS ignored), all submitted at once. Reported: output tokens/s over the whole run
(prefill included), and over decode steps only; mean and p99 time per output token (TPOT,
per request: (t_last - t_first) / (n - 1)) and inter-token latency. Writes JSON to --out.

Run on the device: PYTHONPATH=. python3 benchmarks/e2e_decode.py --out $OUT/e2e.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "attention_bias": False,
    "eos_token_id": 151645, "bos_token_id": 151643, "torch_dtype": "bfloat16",
}


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else float("nan")


def run_ours(model_dir: str, concurrencies: list[int], input_len: int, output_len: int,
             device: str = "cuda", kv_cache_memory_gb: float | None = None,
             modes: tuple[str, ...] = ("async",)) -> list[dict]:
    """Each concurrency in each scheduling mode ("async": the next step launched before this
    one's tokens are read; "sync"), side by side on one engine."""
    from afdserve import LLM, SamplingParams

    llm = LLM(model_dir, load_format="dummy", device=device, dtype="bfloat16", max_num_seqs=max(concurrencies),
              max_num_batched_tokens=8192, max_model_len=input_len + output_len + 16,
              kv_cache_memory_gb=kv_cache_memory_gb)
    engine, rows = llm.engine, []
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    engine.add_request("warmup", torch.randint(0, 151000, (min(64, input_len),), generator=gen).tolist(),
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    for c, mode in [(c, m) for c in concurrencies for m in modes]:
        engine.async_scheduling = mode == "async"
        stamps: dict[str, list[float]] = {}
        for i in range(c):
            engine.add_request(f"{c}-{i}", torch.randint(0, 151000, (input_len,), generator=gen).tolist(), params)
        t0 = time.perf_counter()
        decode_steps, max_running = [], 0  # (batch, seconds) of steps with no prefill work
        while engine.has_unfinished():
            running, waiting = len(engine.scheduler.running), len(engine.scheduler.waiting)
            s0 = time.perf_counter()
            updated = engine.step()
            now = time.perf_counter()
            if (len(updated) == running and len(engine.scheduler.waiting) == waiting
                    and all(r.request_id in stamps for r in updated)):
                decode_steps.append((running, now - s0))  # every running request decoded, none admitted
                max_running = max(max_running, running)
            for req in updated:
                stamps.setdefault(req.request_id, []).append(now)
        total_s = time.perf_counter() - t0
        system = "afdserve" if mode == "async" else "afdserve (sync)"
        rows.append(_row(system, c, input_len, output_len, stamps, total_s, decode_steps, max_running))
        print(json.dumps(rows[-1]), flush=True)
    llm.shutdown()
    del llm, engine
    return rows


def _row(system: str, c: int, input_len: int, output_len: int, stamps: dict, total_s: float,
         decode_steps: list[tuple[int, float]], max_running: int) -> dict:
    """Per-request TPOT and inter-token latency; decode tokens/s over the steps without prefill
    work; the mean step time at the largest batch that ran (KV memory may hold fewer than c)."""
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in stamps.values() if len(t) > 1]
    itl = [b - a for t in stamps.values() for a, b in zip(t, t[1:])]
    full = [s for n, s in decode_steps if n == max_running]
    return {"system": system, "concurrency": c, "input_len": input_len, "output_len": output_len,
            "total_s": total_s, "output_tok_s": c * output_len / total_s, "max_running": max_running,
            "decode_tok_s": sum(n for n, _ in decode_steps) / sum(s for _, s in decode_steps) if full else None,
            "mean_tpot_ms": 1e3 * statistics.mean(tpot) if tpot else None,
            "p99_tpot_ms": 1e3 * _p99(tpot) if tpot else None, "p99_itl_ms": 1e3 * _p99(itl),
            "mean_decode_step_ms": 1e3 * statistics.mean(full) if full else None}


def run_hf(concurrencies: list[int], input_len: int, output_len: int) -> list[dict]:
    import transformers

    cfg = transformers.Qwen3MoeConfig(**{k: v for k, v in QWEN3_30B_A3B.items() if k != "architectures"})
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    rows = []
    for c in concurrencies:
        ids = torch.randint(0, 151000, (c, input_len), device="cuda")
        common = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids[:, :64], max_new_tokens=2, min_new_tokens=2, **common)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **common)
            torch.cuda.synchronize()
            prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **common)
            torch.cuda.synchronize()
            total_s = time.perf_counter() - t0
        tpot_s = (total_s - prefill_s) / (output_len - 1)
        rows.append({"system": "transformers.generate", "concurrency": c, "input_len": input_len,
                     "output_len": output_len, "total_s": total_s, "output_tok_s": c * output_len / total_s,
                     "decode_tok_s": c / tpot_s, "mean_tpot_ms": 1e3 * tpot_s, "prefill_s": prefill_s})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--concurrency", default="1,10,32")
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-concurrency", default="32")
    ap.add_argument("--hf-output-len", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=48, help="fewer layers for a dry run")
    ap.add_argument("--kv-cache-memory-gb", type=float, default=None,
                    help="KV cache size (default: what --gpu-memory-utilization 0.9 leaves after the weights)")
    ap.add_argument("--modes", default="async", help="scheduling modes to run side by side: async,sync")
    ap.add_argument("--commit", default=os.environ.get("AFDSERVE_COMMIT", ""))
    args = ap.parse_args()
    conc = [int(x) for x in args.concurrency.split(",") if x]  # empty: transformers only
    ours = []
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(QWEN3_30B_A3B | {"num_hidden_layers": args.layers}, f)
        if conc:
            ours = run_ours(d, conc, args.input_len, args.output_len, args.device, args.kv_cache_memory_gb,
                            tuple(args.modes.split(",")))
    gc.collect()
    hf = []
    if args.device == "cuda" and args.hf_concurrency:
        torch.cuda.empty_cache()
        hf = run_hf([int(x) for x in args.hf_concurrency.split(",")], args.input_len, args.hf_output_len)
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"device": device, "torch": torch.__version__, "commit": commit,
              "command": "PYTHONPATH=. python3 benchmarks/e2e_decode.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                               for k, v in vars(args).items()),
              "model": "Qwen3-30B-A3B (random bf16 weights, real shapes)", "ours": ours, "hf": hf}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'system':24s} {'conc':>5s} {'out tok/s':>10s} {'decode tok/s':>12s} {'TPOT ms':>8s} {'p99 TPOT':>8s} "
          f"{'step ms':>8s}")
    for r in ours + hf:
        print(f"{r['system']:24s} {r['concurrency']:5d} {r['output_tok_s']:10.1f} {r['decode_tok_s'] or 0:12.1f} "
              f"{r['mean_tpot_ms'] or 0:8.2f} {r.get('p99_tpot_ms') or float('nan'):8.2f} "
              f"{r.get('mean_decode_step_ms') or float('nan'):8.2f}")


if __name__ == "__main__":
    main()
