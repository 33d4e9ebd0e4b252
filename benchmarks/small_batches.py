"""Where the small decode cases lose against the copy ceiling: each kernel's CUDA-graph time next to
an elementwise kernel moving the same bytes, timed the same way (the size-matched floor: one
kernel's launch and ramp-up included; a graph's memcpy node would run on a copy engine).

    python3 benchmarks/small_batches.py --out DIR [--commit HASH]

- decode attention, batch 1-64 x context 2k/4k/8k, both models (the split kernel and its merge);
- expert FFN, 1-32 tokens: the whole FFN and each launch alone (dispatch, gated GEMM w13, GEMM w2,
  combine), each beside the copy of its bytes.
Writes DIR/small_batches.json (device, torch, commit, command) and prints a short table.
Legend: T tokens, D hidden, E experts, K top-k, I intermediate, B sequences, G kv heads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from afdserve.kernels.dispatch import dispatch_rows  # noqa: E402
from afdserve.kernels.experts import combine, fused_experts  # noqa: E402
from afdserve.kernels.moe_gemm import moe_gemm  # noqa: E402
from benchmarks.gpu_kernels import MODELS, ceilings, decode_cases, expert_inputs, expert_weights  # noqa: E402
from benchmarks.gpu_timing import graph_ms, parse_run_args  # noqa: E402

BATCHES, CONTEXTS = [1, 2, 4, 8, 16, 32, 64], [2048, 4096, 8192]
TOKENS = [1, 2, 4, 8, 16, 32]
_copy_cache: dict[int, float] = {}


def copy_ms(nbytes: int) -> float:
    """CUDA-graph time of one elementwise kernel (dst = -src) that reads and writes nbytes in total."""
    n = max(1, nbytes // 4)  # bf16 elements of each half
    if n not in _copy_cache:
        src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        _copy_cache[n] = graph_ms(lambda: torch.neg(src, out=dst))
    return _copy_cache[n]


def attention_rows(name: str, copy_gbps: float) -> list[dict]:
    heads, g, hd = MODELS[name][4:]
    rows = []
    for s, b, run in decode_cases(name, BATCHES, CONTEXTS):
        nbytes = b * s * g * hd * 2 * 2
        ms, floor = graph_ms(run), copy_ms(nbytes)
        rows.append({"model": name, "batch": b, "context": s, "mb": nbytes / 1e6, "ms": ms,
                     "ms_same_size_copy": floor, "frac_of_copy_ceiling": nbytes / ms / 1e6 / copy_gbps,
                     "same_size_copy_frac_of_ceiling": nbytes / floor / 1e6 / copy_gbps,
                     "frac_of_same_size_copy": floor / ms})
    return rows


def expert_rows(name: str, copy_gbps: float) -> list[dict]:
    d, i, e, k = MODELS[name][:4]
    w13_EFD, w2_EDI = expert_weights(name)
    rows = []
    for t in TOKENS:
        x_TD, ids_TK, w_TK = expert_inputs(name, t)
        active = int(ids_TK.unique().numel())
        disp = dispatch_rows(ids_TK, e)
        act = moe_gemm(x_TD, disp.src_N, w13_EFD, disp.counts_E, gated=True)
        y = moe_gemm(act, None, w2_EDI, disp.counts_E, gated=False)
        stages = {  # name: (launch, bytes it must move)
            "ffn": (lambda: fused_experts(x_TD, ids_TK, w_TK, w13_EFD, w2_EDI, impl="triton"),  # noqa: B023
                    active * 3 * d * i * 2 + 2 * t * d * 2),
            "dispatch": (lambda: dispatch_rows(ids_TK, e), t * k * 4 * 3),  # noqa: B023
            "w13": (lambda: moe_gemm(x_TD, disp.src_N, w13_EFD, disp.counts_E, gated=True),  # noqa: B023
                    active * 2 * d * i * 2 + t * k * (d + i) * 2),
            "w2": (lambda: moe_gemm(act, None, w2_EDI, disp.counts_E, gated=False),  # noqa: B023
                   active * d * i * 2 + t * k * (d + i) * 2),
            "combine": (lambda: combine(y, disp.pos_TK, w_TK), t * k * d * 2 + t * d * 2),  # noqa: B023
        }
        row = {"model": name, "tokens": t, "active_experts": active}
        for stage, (fn, nbytes) in stages.items():
            ms, floor = graph_ms(fn), copy_ms(nbytes)
            row[stage] = {"ms": ms, "mb": nbytes / 1e6, "ms_same_size_copy": floor,
                          "frac_of_copy_ceiling": nbytes / ms / 1e6 / copy_gbps,
                          "frac_of_same_size_copy": floor / ms}
        rows.append(row)
    return rows


def table(copy_gbps: float, attn: list[dict], experts: list[dict]) -> str:
    lines = [f"copy ceiling {copy_gbps:.0f} GB/s (1 GiB); fractions below are of it; "
             "'copy' = a graph-timed copy of the same bytes",
             "decode attention        batch   ctx     MB    us  copy us  frac  copy frac  of copy"]
    for r in attn:
        lines.append(f"  {r['model']:<20} {r['batch']:>5} {r['context']:>5} {r['mb']:>6.1f} {r['ms'] * 1e3:>6.1f} "
                     f"{r['ms_same_size_copy'] * 1e3:>7.1f} {r['frac_of_copy_ceiling']:>5.2f} "
                     f"{r['same_size_copy_frac_of_ceiling']:>9.2f} {r['frac_of_same_size_copy']:>8.2f}")
    lines.append("expert FFN (us; in brackets the same-size copy)   ffn            dispatch     w13            "
                 "w2             combine")
    for r in experts:
        cells = "  ".join(f"{r[s]['ms'] * 1e3:>6.1f} [{r[s]['ms_same_size_copy'] * 1e3:>5.1f}]"
                          for s in ("ffn", "dispatch", "w13", "w2", "combine"))
        lines.append(f"  {r['model']:<14} {r['tokens']:>4} tok {r['active_experts']:>3} exp  {cells}")
    return "\n".join(lines)


def main() -> None:
    args = parse_run_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    copy_gbps = ceilings()["copy_gbps"]
    launch_ms = copy_ms(4)  # one element: the fixed cost of one kernel in a graph, timed this way
    attn = [r for name in MODELS for r in attention_rows(name, copy_gbps)]
    torch.cuda.empty_cache()
    experts = [r for name in MODELS for r in expert_rows(name, copy_gbps)]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": args.commit, "command": " ".join(["python3"] + sys.argv), "copy_gbps": copy_gbps,
              "one_element_kernel_ms": launch_ms,
              "attention": attn, "experts": experts}
    with open(os.path.join(args.out, "small_batches.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['device']}, torch {torch.__version__}, commit {args.commit}")
    print(f"one-element kernel in a graph: {launch_ms * 1e3:.1f} us")
    print(table(copy_gbps, attn, experts))


if __name__ == "__main__":
    main()
