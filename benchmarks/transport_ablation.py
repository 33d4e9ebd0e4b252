"""The M2N transport ablation (issue 9, the paper's Fig. 13 analogue) from ``afd_e2e.py`` rows:
AFD 1 attention + 1 expert GPU at m = 1..4 over the shared-slot transport (ipc; its steps as
CUDA graphs, or eager) and over torch.distributed send/recv (p2p, eager). Merges the rows of
one or more runs into one JSON, a PNG and a table.

  python benchmarks/transport_ablation.py --rows RUN1/rows.jsonl RUN2/rows.jsonl \
      --commit C --command "..." --out benchmarks/results/afd_transport_2xH200_571_159
"""

from __future__ import annotations

import argparse
import json


def load_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return sorted((r for r in rows if r.get("kind") == "afd"), key=lambda r: (variant(r), r["m"]))


def variant(r: dict) -> str:
    """The transport and how the steps ran: the shared-slot transport replays CUDA graphs
    unless the row is eager (runs before graphs existed have no "eager" field: eager)."""
    graphs = r["transport"] == "ipc" and r.get("eager") is False
    return f"{r['transport']} {'graphs' if graphs else 'eager'}"


def table(rows: list[dict]) -> str:
    nan = float("nan")
    lines = [f"{'variant':11s} {'m':>2s} {'b':>5s} {'tok/s/GPU':>9s} {'TBT ms':>7s} {'p99':>6s} {'step ms':>7s} "
             f"{'pred':>6s} {'T_a':>5s} {'T_e':>5s} {'busyA':>5s} {'busyE':>5s}"]
    for r in rows:
        step = r.get("step_ms", r["tbt_mean_ms"])  # graph steps are not op-timed: the TBT
        lines.append(f"{variant(r):11s} {r['m']:2d} {r['b']:5d} {r['tok_s_per_gpu']:9.0f} {r['tbt_mean_ms']:7.1f} "
                     f"{r['tbt_p99_ms']:6.1f} {step:7.1f} {r['pred_step_ms']:6.1f} {r.get('t_a_ms', nan):5.2f} "
                     f"{r.get('t_e_ms', nan):5.2f} {r.get('attn_busy', nan):5.2f} {r.get('expert_busy', nan):5.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, marker in zip(sorted({variant(r) for r in rows}), "os^v"):
        rs = [r for r in rows if variant(r) == name]
        ms = [r["m"] for r in rs]
        a1.plot(ms, [r["tok_s_per_gpu"] for r in rs], marker=marker, label=name)
        a2.plot(ms, [r.get("step_ms", r["tbt_mean_ms"]) for r in rs], marker=marker, label=f"{name} measured")
        a2.plot(ms, [r["pred_step_ms"] for r in rs], marker=marker, linestyle=":", alpha=0.5,
                label=f"{name} predicted")
    a1.set(xlabel="micro-batches m", ylabel="tokens/s per GPU", title=title)
    a2.set(xlabel="micro-batches m", ylabel="executor step (ms)", title="step time, measured and predicted")
    for ax in (a1, a2):
        ax.set_xticks([1, 2, 3, 4])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", required=True)
    ap.add_argument("--out", required=True, help="path prefix of the .json and .png")
    ap.add_argument("--commit", default="")
    ap.add_argument("--command", action="append", default=[])
    ap.add_argument("--device", default="2x NVIDIA H200 (nvidia-h200-x2)")
    args = ap.parse_args()
    rows = load_rows(args.rows)
    with open(args.out + ".json", "w") as f:
        json.dump({"device": args.device, "commit": args.commit, "commands": args.command,
                   "model": "Mixtral-8x7B shape, random bf16 weights", "input_len": 571, "output_len": 159,
                   "prefill": "skipped (benchmark_skip_prefill)", "rows": rows}, f, indent=1)
    plot(rows, args.out + ".png", "AFD 1+1 H200, Mixtral-8x7B, 571/159")
    print(table(rows))


if __name__ == "__main__":
    main()
