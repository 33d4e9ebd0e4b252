"""What a replay means: step time, throughput, time between tokens, utilisation, bubbles."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from afdserve.simulator.replay import Trace


@dataclass
class SimResult:
    step_time_s: float  # mean duration of a global step (all layers, all micro-batches, sampling)
    step_times_s: np.ndarray  # (steps,)
    throughput_tok_s: float  # tokens_per_step / step_time_s
    tbt_s: np.ndarray  # time between consecutive tokens of each (node, micro-batch), steps >= 1
    iter_latency_s: np.ndarray  # (steps, n_a, m): first ATTN start to last COMBINE end
    attn_util: float  # mean over attention nodes of busy / makespan
    expert_util: float
    attn_link_util: float
    expert_link_util: float
    attn_bubble_frac: float  # mean idle share inside each node's active span (first to last compute)
    expert_bubble_frac: float
    makespan_s: float

    def to_dict(self) -> dict:
        """JSON-ready summary (distributions as percentiles)."""
        tbt = self.tbt_s.astype(float)
        return {
            "step_time_s": self.step_time_s, "throughput_tok_s": self.throughput_tok_s,
            "tbt_s": {"mean": float(tbt.mean()), "p50": float(np.percentile(tbt, 50)),
                      "p90": float(np.percentile(tbt, 90)), "p99": float(np.percentile(tbt, 99)),
                      "max": float(tbt.max())},
            "iter_latency_s_mean": float(self.iter_latency_s.astype(float).mean()),
            "utilisation": {"attn": self.attn_util, "expert": self.expert_util,
                            "attn_link": self.attn_link_util, "expert_link": self.expert_link_util},
            "bubble_frac": {"attn": self.attn_bubble_frac, "expert": self.expert_bubble_frac},
            "makespan_s": self.makespan_s,
        }


def summarize(tr: Trace, tokens_per_step: float) -> SimResult:
    """Turn raw replay timings into the numbers a user reads."""
    ends = tr.step_end_s.astype(float).max(axis=1)
    step_times = np.diff(np.concatenate([[0.0], ends]))
    makespan = float(ends[-1])
    done = tr.mb_done_s.astype(float)
    tbt = (done[1:] - done[:-1]).ravel() if len(done) > 1 else step_times.copy()
    step_time = float(step_times.mean())
    return SimResult(
        step_time_s=step_time, step_times_s=step_times,
        throughput_tok_s=tokens_per_step / step_time if step_time > 0 else 0.0, tbt_s=tbt,
        iter_latency_s=done - tr.mb_start_s.astype(float),
        attn_util=_mean(tr.attn_busy_s) / makespan, expert_util=_mean(tr.expert_busy_s) / makespan,
        attn_link_util=_mean(tr.attn_link_busy_s) / makespan, expert_link_util=_mean(tr.expert_link_busy_s) / makespan,
        attn_bubble_frac=_bubble(tr.attn_busy_s, tr.attn_span_s),
        expert_bubble_frac=_bubble(tr.expert_busy_s, tr.expert_span_s), makespan_s=makespan,
    )


def _mean(x: np.ndarray) -> float:
    return float(np.asarray(x, dtype=float).mean())


def _bubble(busy: np.ndarray, span: np.ndarray) -> float:
    busy, span = np.asarray(busy, dtype=float), np.asarray(span, dtype=float)
    return float(np.mean(np.where(span > 0, 1.0 - busy / np.where(span > 0, span, 1.0), 0.0)))
