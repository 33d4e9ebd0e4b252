"""``afdserve bench serve``: an online serving benchmark in the shape of ``vllm bench serve``.

Random prompts of exactly ``--input-len`` tokens (sent as token ids to ``/v1/completions``, so
no tokenizer is needed here; the ids come from the server's ``/tokenize`` or ``--tokenizer``),
Poisson arrivals at ``--request-rate``, streamed responses. Reports TTFT, TPOT, ITL and
end-to-end latency (mean, median, std, percentiles) and throughput; saves them as JSON with
vLLM's key names (``mean_ttft_ms``, ``p99_itl_ms``, ``output_throughput``, ...)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime

WORDS = ("the quick brown fox jumps over a lazy dog while experts and attention trade tokens across many "
         "devices hello world model serving batch cache latency throughput 0 1 2 3 4 5 6 7 8 9").split()
METRICS = ("ttft", "tpot", "itl", "e2el")
NAMES = {"ttft": ("Time to First Token", "TTFT"), "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
         "itl": ("Inter-token Latency", "ITL"), "e2el": ("End-to-end Latency", "E2EL")}


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (default: from --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="openai", choices=["openai", "vllm", "afdserve"],
                   help="vLLM's flag; every choice streams /v1/completions")
    p.add_argument("--dataset-name", default="random", choices=["random"], help="random token prompts only")
    p.add_argument("--model", default=None, help="model name (default: the first one /v1/models lists)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", "--random-input-len", type=int, default=128, dest="input_len")
    p.add_argument("--output-len", "--random-output-len", type=int, default=128, dest="output_len")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --output-len tokens (default: on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory for prompt ids (default: /tokenize)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    p.add_argument("--result-file", "--result-filename", default=None, dest="result_file",
                   help="JSON output (default: bench-serve-<time>.json)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")


@dataclass
class Result:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def cmd_bench_serve(args: argparse.Namespace) -> int:
    args.base_url = args.base_url or f"http://{args.host}:{args.port}"
    result = asyncio.run(run_benchmark(args))
    print_report(result)
    path = args.result_file or f"bench-serve-{datetime.now():%Y%m%d-%H%M%S}.json"
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results saved to {path}")
    return 0 if result["completed"] else 1


async def run_benchmark(args: argparse.Namespace) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=args.timeout) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        pool = await token_pool(client, model, args.tokenizer)
        rng = random.Random(args.seed)
        prompts = [[rng.choice(pool) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
        gate = asyncio.Semaphore(args.max_concurrency or len(prompts) or 1)
        start = time.perf_counter()
        results = await asyncio.gather(*[
            _send_after(client, model, p, args, gate, delay) for p, delay in zip(prompts, _arrivals(args, rng))])
        duration = time.perf_counter() - start
    summary = summarize(results, duration, [float(p) for p in args.metric_percentiles.split(",")])
    return {"date": datetime.now().isoformat(timespec="seconds"), "backend": "openai", "base_url": args.base_url,
            "model_id": model, "num_prompts": args.num_prompts, "request_rate": args.request_rate,
            "max_concurrency": args.max_concurrency, "input_len": args.input_len, "output_len": args.output_len,
            **summary}


def _arrivals(args: argparse.Namespace, rng: random.Random) -> list[float]:
    """Send times from the start: Poisson arrivals at the request rate (all at 0 for inf)."""
    t, out = 0.0, []
    for _ in range(args.num_prompts):
        out.append(t)
        if args.request_rate != float("inf"):
            t += rng.expovariate(args.request_rate)
    return out


async def token_pool(client, model: str, tokenizer_dir: str | None) -> list[int]:
    """Token ids to build prompts from: a local tokenizer's vocabulary or the server's /tokenize."""
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        special = set(tok.all_special_ids)
        return [i for i in range(len(tok)) if i not in special]
    r = await client.post("/tokenize", json={"model": model, "prompt": " ".join(WORDS), "add_special_tokens": False})
    r.raise_for_status()
    return sorted(set(r.json()["tokens"]))


async def _send_after(client, model: str, prompt: list[int], args, gate: asyncio.Semaphore, delay: float) -> Result:
    await asyncio.sleep(delay)
    async with gate:
        payload = {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0.0,
                   "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
        return await stream_request(client, payload, len(prompt))


async def stream_request(client, payload: dict, prompt_len: int) -> Result:
    """One streamed completion, timing every chunk that carries text."""
    res, chunks = Result(prompt_len), 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in r.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else ""
                if not data or data == "[DONE]":
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", str(obj["error"]))
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"]["completion_tokens"]
                if obj.get("choices") and obj["choices"][0].get("text"):
                    now = time.perf_counter()
                    if chunks:
                        res.itl.append(now - last)
                    else:
                        res.ttft = now - start
                    last, chunks = now, chunks + 1
        res.latency = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.success = chunks > 0 or res.output_tokens > 0
    except Exception as e:  # noqa: BLE001 -- a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


def summarize(results: list[Result], duration: float, percentiles: list[float]) -> dict:
    import numpy as np

    ok = [r for r in results if r.success]
    values = {"ttft": [r.ttft for r in ok], "e2el": [r.latency for r in ok],
              "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
              "itl": [x for r in ok for x in r.itl]}
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    out = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
           "total_token_throughput": (total_in + total_out) / duration, "percentiles": percentiles}
    for name in METRICS:
        ms = np.array(values[name] or [0.0]) * 1000
        out |= {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
                f"std_{name}_ms": float(ms.std())}
        out |= {f"p{_pct(p)}_{name}_ms": float(np.percentile(ms, p)) for p in percentiles}
    out |= {"input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
            "errors": [r.error for r in results]}
    return out


def _pct(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def print_report(s: dict) -> None:
    """The table ``vllm bench serve`` prints."""
    def row(label: str, value) -> None:
        print(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}")

    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", s["duration"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total Token throughput (tok/s):", s["total_token_throughput"])
    for name in METRICS:
        title, short = NAMES[name]
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        row(f"Mean {short} (ms):", s[f"mean_{name}_ms"])
        row(f"Median {short} (ms):", s[f"median_{name}_ms"])
        for p in s["percentiles"]:
            row(f"P{_pct(p)} {short} (ms):", s[f"p{_pct(p)}_{name}_ms"])
    print("=" * 50)
