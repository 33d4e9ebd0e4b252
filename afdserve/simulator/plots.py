"""PNG plots of the sweeps (the analogues of the paper's Fig. 14 and Fig. 15)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_SPECS = {
    # sweep: x key, x label, bar label, line key, line label, line scale, title
    "m": ("m", "micro-batches m", "normalised throughput", "utilisation.expert", "expert utilisation", 1.0,
          "Throughput vs micro-batches (cf. Fig. 14)"),
    "attn-groups": ("n_a", "attention groups n_a", "normalised throughput per GPU", "tbt_s.p50",
                    "median TBT (ms)", 1e3, "Attention replicas vs throughput per GPU (cf. Fig. 15)"),
    "skew": ("alpha", "Zipf skew alpha", "normalised throughput", "max_expert_share", "hottest expert share", 1.0,
             "Routing skew vs throughput"),
}


def plot_sweep(sweep: str, rows: list[dict], path: str, title_suffix: str = "", marker: float | None = None) -> None:
    """Bars: normalised throughput; line (right axis): the sweep's second quantity.

    ``marker`` draws a dashed vertical line (e.g. the balance point n* or m = 2(1 + T_c/T_f)).
    """
    x_key, x_label, bar_label, line_key, line_label, scale, title = _SPECS[sweep]
    xs = [r[x_key] for r in rows]
    pos = list(range(len(xs)))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.bar(pos, [r["normalised"] for r in rows], color="#4c72b0", label=bar_label)
    ax.set_xticks(pos, [f"{x:g}" for x in xs])
    ax.set_xlabel(x_label)
    ax.set_ylabel(bar_label)
    ax.set_ylim(0, 1.1)
    ax2 = ax.twinx()
    ax2.plot(pos, [_get(r, line_key) * scale for r in rows], "o-", color="#dd8452", label=line_label)
    ax2.set_ylabel(line_label)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="best", fontsize=8)
    if marker is not None and len(xs) > 1:
        # place the marker on the bar axis by linear interpolation between x values
        ax.axvline(_position(xs, marker), color="grey", linestyle="--", linewidth=1)
    ax.set_title(title + (f"\n{title_suffix}" if title_suffix else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _get(row: dict, dotted: str) -> float:
    value = row
    for part in dotted.split("."):
        value = value[part]
    return float(value)


def _position(xs: list[float], x: float) -> float:
    if x <= xs[0]:
        return 0.0
    for i in range(1, len(xs)):
        if x <= xs[i]:
            return i - 1 + (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return float(len(xs) - 1)
