"""End-to-end decode of the AFD, colocated and single-GPU layouts, measured next to the
planner's prediction (issues 7 and 8).

Mixtral-8x7B shape (all 32 layers), random bf16 weights made on the GPUs (``load_format=
"dummy"``). Requests of ``--input-len``/``--output-len`` tokens, EOS ignored. The prompts' KV is
not computed (``benchmark_skip_prefill``): every request starts decoding at once with its full
context in the cache, so each configuration is timed in steady decode at large batch without
paying minutes of prefill; attention still reads the whole context every step.

Per configuration and per-replica batch b (all b requests submitted at once):
  tbt        time between tokens seen by the frontend (mean, p99), tokens/s per GPU;
  step       the executor's step (AFD: the whole ping-pong pipeline of all layers) on attention
             rank 0, host clock; T_a, T_e per layer and micro-batch and the busy fraction of each
             side from CUDA events (``AFDSERVE_OP_TIMING``);
  predicted  the planner's performance model (``planner.perf_model``) with coefficients fitted
             in this run (``planner.measure`` on GPU 0) and T_c from this run's transfer
             benchmark (``benchmarks/transfer.py``), at the same b and m.

Run on the device (2 GPUs):
  PYTHONPATH=. python3 benchmarks/afd_e2e.py --out-dir $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import transfer  # noqa: E402
from benchmarks.afd_predict import dtype_name, fit_profile, predict, write_profile  # noqa: E402

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
BLOCK = 16


@dataclass(frozen=True)
class Layout:
    name: str
    layout: str  # "afd", "colocated" or "single"
    n_a: int = 1
    n_e: int = 1
    m: int = 1
    transport: str = "auto"  # AFD: "ipc", "p2p" or "auto" (--afd-transport)
    eager: bool = False  # no CUDA graphs; the multi-process layouts then time every op (AFDSERVE_OP_TIMING)

    @property
    def num_gpus(self) -> int:
        return {"afd": self.n_a + self.n_e, "colocated": self.n_a, "single": 1}[self.layout]

    def options(self) -> dict:
        if self.layout == "single":
            return {"layout": "single", "enforce_eager": self.eager}
        return {"layout": self.layout, "attn_groups": self.n_a, "expert_groups": self.n_e,
                "micro_batches": self.m, "afd_transport": self.transport, "enforce_eager": self.eager}



def parse_layouts(spec: str) -> list[Layout]:
    """``afd:1x1:m2,afd:1x1:m2:p2p,afd:1x1:m2:eager,colocated:2,single`` -> layouts
    (afd:<n_a>x<n_e>:m<m>[:ipc|p2p][:eager], colocated:<ranks>, single[:eager]; eager: no CUDA
    graphs, and per-op timing for the multi-process layouts)."""
    out = []
    for item in spec.split(","):
        parts = item.split(":")
        eager = parts[-1] == "eager"
        if eager:
            parts = parts[:-1]
        tail = " eager" if eager else ""
        if parts[0] == "afd":
            n_a, n_e = (int(x) for x in parts[1].split("x"))
            m = int(parts[2][1:])
            transport = parts[3] if len(parts) > 3 else "auto"
            suffix = "" if transport == "auto" else f" {transport}"
            out.append(Layout(f"afd {n_a}a+{n_e}e m={m}{suffix}{tail}", "afd", n_a, n_e, m, transport, eager))
        elif parts[0] == "colocated":
            out.append(Layout(f"colocated x{parts[1]}", "colocated", int(parts[1]), int(parts[1]), 1))
        elif parts[0] == "single":
            out.append(Layout(f"single GPU{tail}", "single", eager=eager))
        else:
            raise ValueError(f"unknown layout {item!r}")
    return out


# -- memory: the largest per-replica batch whose KV fits ---------------------------------------

def kv_bytes_per_seq(cfg: dict, seq_len: int) -> int:
    blocks = math.ceil(seq_len / BLOCK)
    return blocks * BLOCK * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * 2 * cfg["num_hidden_layers"]


def weight_bytes(cfg: dict, experts_fraction: float, attention: bool) -> float:
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    attn = (L * (2 * h * q + 2 * h * kv) + 2 * cfg["vocab_size"] * h) * 2 if attention else 0
    experts = L * cfg["num_local_experts"] * 3 * h * cfg["intermediate_size"] * 2 * experts_fraction
    return attn + experts


def max_batch(cfg: dict, lay: Layout, seq_len: int, gpu_bytes: float, headroom: float) -> int:
    """Per-replica batch that fills the attention GPU's memory with KV (multiple of 16)."""
    if lay.layout == "afd":
        weights = weight_bytes(cfg, 0.0, True)
    elif lay.layout == "colocated":
        weights = weight_bytes(cfg, 1.0 / lay.n_e, True)
    else:
        weights = weight_bytes(cfg, 1.0, True)
    free = gpu_bytes - headroom - weights
    return max(16, int(free // kv_bytes_per_seq(cfg, seq_len)) // 16 * 16)


# -- one configuration -------------------------------------------------------------------------

def run_layout(model_dir: str, cfg: dict, lay: Layout, batches: list[int], input_len: int, output_len: int,
               timing_dir: str, device: str) -> list[dict]:
    from afdserve import LLM, SamplingParams

    if _op_timed(lay, device):
        os.environ["AFDSERVE_OP_TIMING"] = timing_dir
    seq_len = input_len + output_len + 1
    bmax = max(batches)
    # graphs only for the micro-batch sizes this run has (each replica's batch b split over m; the warm-up's 1),
    # not the whole ladder up to the largest batch: start-up in seconds
    sizes = sorted({1, 2, 4, 8} | {-(-b // lay.m) for b in batches})
    llm = LLM(model_dir, load_format="dummy", device=device, dtype=dtype_name(device), max_num_seqs=bmax,
              max_num_batched_tokens=max(bmax, 256), max_model_len=seq_len + BLOCK,
              num_kv_blocks=bmax * math.ceil((seq_len + BLOCK) / BLOCK), benchmark_skip_prefill=True,
              cuda_graph_sizes=sizes, **lay.options())
    rows = []
    try:
        engine = llm.engine
        gen = torch.Generator().manual_seed(0)

        def prompt() -> list[int]:
            return torch.randint(3, cfg["vocab_size"] - 1, (input_len,), generator=gen).tolist()

        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for i in range(lay.n_a):
            engine.add_request(f"warm{i}", prompt(), warm)
        while engine.has_unfinished():
            engine.step()
        for b in batches:
            total = b * (lay.n_a if lay.layout != "single" else 1)
            stamps: dict[str, list[float]] = {}
            for i in range(total):
                engine.add_request(f"{b}-{i}", prompt(), params)
            t0 = time.perf_counter()
            while engine.has_unfinished():
                for req in engine.step():
                    stamps.setdefault(req.request_id, []).append(time.perf_counter())
            elapsed = time.perf_counter() - t0
            itl = [y - x for t in stamps.values() for x, y in zip(t, t[1:])]
            rows.append({"layout": lay.name, "kind": lay.layout, "n_a": lay.n_a, "n_e": lay.n_e, "m": lay.m,
                         "transport": _transport(lay, device), "eager": lay.eager,
                         "gpus": lay.num_gpus, "b": b, "total_batch": total, "elapsed_s": elapsed,
                         "tok_s": total * output_len / elapsed,
                         "tok_s_per_gpu": total * output_len / elapsed / lay.num_gpus,
                         "tbt_mean_ms": 1e3 * statistics.mean(itl), "tbt_p99_ms": 1e3 * transfer.p99(itl)})
            r = rows[-1]
            print(f"  {lay.name} b={b}: {r['tok_s_per_gpu']:.0f} tok/s/GPU, TBT {r['tbt_mean_ms']:.1f} ms "
                  f"(p99 {r['tbt_p99_ms']:.1f})", flush=True)
    finally:
        llm.shutdown()
        del llm
        os.environ.pop("AFDSERVE_OP_TIMING", None)
    if _op_timed(lay, device):
        add_op_timing(rows, lay, timing_dir)
    return rows


def add_op_timing(rows: list[dict], lay: Layout, timing_dir: str) -> None:
    """Per-op device times of the steady decode steps of each batch (all b requests in the step)."""
    recs = {}
    for name in os.listdir(timing_dir):
        with open(os.path.join(timing_dir, name)) as f:
            recs[int(name[4:-6])] = [json.loads(line) for line in f]
    attn0 = recs.get(0, [])
    for row in rows:
        steps = [i for i, r in enumerate(attn0) if r["tokens"] == row["b"]]
        if not steps:
            continue

        def mean_of(rank: int, kind: str, steps=steps) -> float:
            rr = [recs[rank][i] for i in steps if i < len(recs[rank]) and recs[rank][i].get(f"{kind}_ops")]
            return statistics.mean(r[f"{kind}_s"] / r[f"{kind}_ops"] for r in rr) if rr else float("nan")

        def busy(rank: int, kinds: tuple[str, ...], steps=steps) -> float:
            rr = [recs[rank][i] for i in steps if i < len(recs[rank])]
            return statistics.mean(sum(r.get(f"{k}_s", 0.0) for k in kinds) / r["wall_s"] for r in rr)

        row["steps_timed"] = len(steps)
        row["step_ms"] = 1e3 * statistics.mean(attn0[i]["wall_s"] for i in steps)
        row["t_a_ms"] = 1e3 * mean_of(0, "attn")
        if lay.layout == "afd":
            row["t_route_ms"] = 1e3 * mean_of(0, "route")
            row["t_e_ms"] = 1e3 * mean_of(lay.n_a, "expert")
            row["attn_busy"] = busy(0, ("attn", "route"))
            row["expert_busy"] = busy(lay.n_a, ("expert",))
        else:
            row["t_e_ms"] = 1e3 * mean_of(0, "expert")
            row["t_exchange_ms"] = 1e3 * mean_of(0, "exchange")
            row["gpu_busy"] = busy(0, ("attn", "expert"))


def _op_timed(lay: Layout, device: str) -> bool:
    """Per-op timing (CUDA events on GPU): the multi-process layouts' eager steps (a replayed
    graph has no ops to time; disaggregated steps run as graphs on CUDA with the shared-slot
    transport unless eager)."""
    graphed = device == "cuda" and not lay.eager and _transport(lay, device) == "ipc"
    return lay.layout != "single" and not graphed


def _transport(lay: Layout, device: str) -> str | None:
    """The AFD transport a layout runs with ("auto": ipc on one node with CUDA, else p2p)."""
    if lay.layout != "afd":
        return None
    return lay.transport if lay.transport != "auto" else ("ipc" if device == "cuda" else "p2p")


def _device_name(device: str) -> str:
    if device != "cuda":
        return device
    return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"


# -- report ------------------------------------------------------------------------------------

def best_under_slo(rows: list[dict], slo_ms: float) -> dict[str, dict]:
    best = {}
    for r in rows:
        if r["tbt_mean_ms"] <= slo_ms and r["tok_s_per_gpu"] > best.get(r["layout"], {}).get("tok_s_per_gpu", 0):
            best[r["layout"]] = r
    return best


def plot_m_sweep(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    afd = [r for r in rows if r["kind"] == "afd" and r["n_a"] == 1]
    if not afd:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for b, eager in sorted({(r["b"], r.get("eager", False)) for r in afd}):
        pts = sorted((r["m"], r["tok_s_per_gpu"], r.get("pred_tok_s_per_gpu")) for r in afd
                     if r["b"] == b and r.get("eager", False) == eager)
        how = "eager" if eager else "CUDA graphs"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if not eager else "o:", label=f"measured ({how}), b={b}")
        if not eager and all(p[2] for p in pts):
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", label=f"predicted, b={b}")
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("decode tokens/s per GPU")
    ax.set_xticks(sorted({r["m"] for r in afd}))
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_ratio_sweep(rows: list[dict], best: dict[str, dict], path: str, title: str) -> None:
    """Tokens/s per GPU against attention GPUs per expert GPU (the paper's Fig. 15 analogue):
    the best batch under the SLO per layout, measured and predicted (the planner's model, equal
    to the simulator's replay for uniform costs), colocated layouts as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    afd = sorted((r for r in best.values() if r["kind"] == "afd" and r["n_e"] == 1), key=lambda r: (r["n_a"], r["m"]))
    if len({r["n_a"] for r in afd}) < 2:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in sorted({r["m"] for r in afd}):
        pts = [r for r in afd if r["m"] == m]
        ax.plot([r["n_a"] for r in pts], [r["tok_s_per_gpu"] for r in pts], "o-", label=f"AFD m={m}, measured")
        ax.plot([r["n_a"] for r in pts], [r["pred_tok_s_per_gpu"] for r in pts], "x--", label=f"AFD m={m}, predicted")
    for r in best.values():
        if r["kind"] == "colocated":
            ax.axhline(r["tok_s_per_gpu"], linestyle=":", color="gray")
            ax.text(afd[0]["n_a"], r["tok_s_per_gpu"], f" {r['layout']}", va="bottom", fontsize=8)
    ax.set_xlabel("attention GPUs per expert GPU")
    ax.set_ylabel("decode tokens/s per GPU (best batch under the SLO)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    head = (f"{'layout':22s} {'b':>5s} {'tok/s/GPU':>9s} {'TBT ms':>7s} {'p99':>6s} {'step':>6s} {'pred':>6s} "
            f"{'err':>5s} {'T_a':>5s} {'T_e':>5s} {'T_c*':>5s} {'busyA':>5s} {'busyE':>5s}")
    lines = [head]
    for r in rows:
        step, pred = r.get("step_ms"), r.get("pred_step_ms")
        if step is None:  # CUDA-graph steps: no per-op timing; compare the TBT
            step, pred = r["tbt_mean_ms"], r.get("pred_tbt_ms")
        err = f"{100 * (pred - step) / step:+5.0f}%" if step and pred else "    -"
        lines.append(f"{r['layout']:22s} {r['b']:5d} {r['tok_s_per_gpu']:9.0f} {r['tbt_mean_ms']:7.1f} "
                     f"{r['tbt_p99_ms']:6.1f} {step or float('nan'):6.1f} {pred or float('nan'):6.1f} {err} "
                     f"{r.get('t_a_ms', float('nan')):5.2f} {r.get('t_e_ms', float('nan')):5.2f} "
                     f"{r.get('pred_t_c_ms', float('nan')):5.2f} "
                     f"{r.get('attn_busy', r.get('gpu_busy', float('nan'))):5.2f} "
                     f"{r.get('expert_busy', float('nan')):5.2f}")
    return "\n".join(lines)


def load_comm(args: argparse.Namespace, cuda: bool) -> list[dict]:
    """The transfer benchmark's rows: reused from ``--transfer-json`` or run (and saved) now."""
    if args.transfer_json:
        with open(args.transfer_json) as f:
            return json.load(f)["results"]
    t0 = time.perf_counter()
    comm = transfer.run(1, 1, 16, 16 if cuda else 1, iters=100 if cuda else 5, device=args.device)
    with open(os.path.join(args.out_dir, f"transfer_{args.tag}.json"), "w") as f:
        json.dump({"m": 1, "n": 1, "results": comm, "device": _device_name(args.device)}, f, indent=1)
    print(transfer.table(comm), flush=True)
    print(f"[transfer {time.perf_counter() - t0:.0f} s]", flush=True)
    return comm


def batches_for(lay: Layout, cfg: dict, args: argparse.Namespace, seq_len: int, gpu_bytes: float) -> list[int]:
    """The per-replica batches ``--batches`` asks for, relative to the layout's memory max."""
    top = max_batch(cfg, lay, seq_len, gpu_bytes, args.headroom_gb * 1e9)
    if args.batches == "max":
        return [top]
    if args.batches == "auto":
        return sorted({max(16, top // 4 // 16 * 16), top})
    if args.batches.startswith("f"):  # fractions of the memory max, e.g. f0.25,f0.5,f1
        return sorted({max(16, int(float(x[1:]) * top) // 16 * 16) for x in args.batches.split(",")})
    return [int(x) for x in args.batches.split(",")]


def run_and_predict(lay: Layout, batches: list[int], model_dir: str, cfg: dict, args: argparse.Namespace, shape,
                    prof: dict, comm: list[dict], ctx: float) -> list[dict]:
    """One layout's measured rows with the model's prediction beside each (appended to rows.jsonl
    as they come, so a later timeout loses nothing); a failing layout gives one error row."""
    t0 = time.perf_counter()
    try:
        got = run_layout(model_dir, cfg, lay, batches, args.input_len, args.output_len,
                         os.path.join(model_dir, "timing-" + lay.name.replace(" ", "_").replace("=", "")),
                         args.device)
    except Exception as e:  # one failing layout must not lose the others' results
        print(f"[{lay.name} failed: {type(e).__name__}: {e}]", flush=True)
        return [{"layout": lay.name, "error": f"{type(e).__name__}: {e}"}]
    for r in got:
        r |= predict(r, shape, prof, comm, ctx)
        r["pred_tok_s_per_gpu"] = r["total_batch"] / (r["pred_tbt_ms"] / 1e3) / lay.num_gpus
        with open(os.path.join(args.out_dir, "rows.jsonl"), "a") as f:
            f.write(json.dumps(r) + "\n")
    print(f"[{lay.name} {time.perf_counter() - t0:.0f} s]", flush=True)
    return got


def save_results(args: argparse.Namespace, prof: dict, rows: list[dict]) -> None:
    """The run's JSON (device, commit, command, fitted profile, rows), the plots and the table."""
    ok = [r for r in rows if "error" not in r]
    commit = os.environ.get("AFDSERVE_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "device": _device_name(args.device), "torch": torch.__version__,
        "commit": commit, "command": "PYTHONPATH=. python3 benchmarks/afd_e2e.py " + " ".join(sys.argv[1:]),
        "model": "Mixtral-8x7B shape, random bf16 weights", "input_len": args.input_len,
        "output_len": args.output_len, "slo_ms": args.slo_ms, "prefill": "skipped (benchmark_skip_prefill)",
        "profile": {"attn": vars(prof["attn"]), "expert": vars(prof["expert"]),
                    "route_s": {g: [tok, call] for g, tok, call in prof["route"].by_groups},
                    "sample_s": prof["sample"], "samples": prof["samples"]},
        "rows": rows, "best_under_slo": best_under_slo(ok, args.slo_ms),
    }
    name = f"afd_e2e_{args.tag}_{args.input_len}_{args.output_len}"
    with open(os.path.join(args.out_dir, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_m_sweep(ok, os.path.join(args.out_dir, name + "_m_sweep.png"),
                 f"Mixtral-8x7B, {args.input_len}/{args.output_len}, 1 attention + 1 expert GPU")
    plot_ratio_sweep(ok, result["best_under_slo"], os.path.join(args.out_dir, name + "_ratio_sweep.png"),
                     f"Mixtral-8x7B, {args.input_len}/{args.output_len}, TBT SLO {args.slo_ms:g} ms")
    print(table(ok))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--layouts", default="afd:1x1:m1,afd:1x1:m2,afd:1x1:m3,afd:1x1:m4,afd:1x1:m1:eager,"
                                         "afd:1x1:m2:eager,colocated:2,single")
    ap.add_argument("--input-len", type=int, default=571)
    ap.add_argument("--output-len", type=int, default=159)
    ap.add_argument("--batches", default="auto",
                    help="per-replica batches (comma-separated), max: the memory max, auto: max/4 and max, "
                         "f0.25,f0.5,f1: fractions of the memory max")
    ap.add_argument("--slo-ms", type=float, default=150.0)
    ap.add_argument("--headroom-gb", type=float, default=14.0, help="GPU memory kept free of weights and KV")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a dry run")
    ap.add_argument("--transfer-json", default=None, help="reuse a transfer benchmark instead of running it")
    ap.add_argument("--tag", default="2xH200")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (use --tiny)")
    ap.add_argument("--tiny", action="store_true", help="small hidden sizes (dry runs on CPU)")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    cfg = MIXTRAL_8X7B | {"num_hidden_layers": args.layers}
    if args.tiny:
        cfg |= {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 64, "vocab_size": 1000}
    from afdserve.planner.models import load_shape

    model_dir = tempfile.mkdtemp()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    shape = load_shape(model_dir)
    cuda = args.device == "cuda"
    device = torch.device("cuda:0" if cuda else "cpu")
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 3e9
    layouts = parse_layouts(args.layouts)
    seq_len = args.input_len + args.output_len + 1
    ctx = args.input_len + args.output_len / 2

    comm = load_comm(args, cuda)
    plan = {lay: batches_for(lay, cfg, args, seq_len, gpu_bytes) for lay in layouts}
    all_b = sorted({b for bs in plan.values() for b in bs})
    t0 = time.perf_counter()
    prof = fit_profile(shape, device, 2 * max(all_b), tuple(sorted({16, 64, 256, max(all_b)})),
                       (args.input_len, seq_len, 2 * seq_len))
    print(f"[profile {time.perf_counter() - t0:.0f} s] attn {prof['attn']} expert {prof['expert']}", flush=True)
    write_profile(os.path.join(args.out_dir, f"profile_{args.tag}.json"), prof, comm, _device_name(args.device))
    if cuda:
        torch.cuda.empty_cache()
    rows = []
    for lay in layouts:
        rows += run_and_predict(lay, plan[lay], model_dir, cfg, args, shape, prof, comm, ctx)
    save_results(args, prof, rows)
    shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
