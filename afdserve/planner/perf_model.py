"""The performance model of DESIGN.md §7 as pure functions (no I/O). Units are in the names.

Per layer and micro-batch: T_a = k1·b_a + k2 on an attention group (k1 grows with the average
context: k1 = k1_tok + k1_ctx·s), T_e = k3·pairs + k4·experts_held + overhead on an expert
group, T_c = max(send, receive) of the transfer bytes over the link at the utilisation the
measured curve gives for that message size (eq. 6, with bytes instead of elements).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from afdserve.planner.hardware import GPU
from afdserve.planner.models import MoEShape

UtilCurve = tuple[tuple[float, float], ...]  # (message bytes, fraction of link bandwidth), ascending

# Assumed when no transport profile exists: util = 0.9·x / (x + 64 KiB), i.e. half of the
# link at 64 KiB, 72% at 256 KiB, 85% at 1 MiB (the paper's regime is hundreds of KB).
DEFAULT_UTIL_CURVE: UtilCurve = tuple((float(2 ** p), 0.9 * 2 ** p / (2 ** p + 65536)) for p in range(10, 27))


@dataclass(frozen=True)
class AttnCoeffs:
    """T_a = (k1_tok + k1_ctx·s)·b_a + k2, per layer per micro-batch on one attention group."""

    k1_s_per_token: float
    k1_s_per_token_ctx: float  # per token per cached context token (the KV read)
    k2_s: float
    source: str = "roofline"

    def k1_s(self, avg_seq_len: float) -> float:
        return self.k1_s_per_token + self.k1_s_per_token_ctx * avg_seq_len


@dataclass(frozen=True)
class ExpertCoeffs:
    """T_e = k3·pairs + k4·experts_held + overhead, per layer per micro-batch on one expert group."""

    k3_s_per_token: float  # per (token, expert) pair
    k4_s_per_expert: float  # weight read of one expert's layer
    overhead_s: float = 0.0  # per group (launches, TP all-reduce latency)
    source: str = "roofline"


@dataclass(frozen=True)
class RouteCoeffs:
    """The attention side's split of a micro-batch's rows by expert group (``transport.route``):
    seconds per token and per call, measured for some numbers of groups (the nearest one is
    used). Only a profile measures it (no roofline: it is launch-bound); empty = no cost."""

    by_groups: tuple[tuple[int, float, float], ...] = ()  # (groups, s per token, s per call)

    def time_s(self, tokens: float, groups: int) -> float:
        if not self.by_groups:
            return 0.0
        _, per_token, per_call = min(self.by_groups, key=lambda g: (abs(g[0] - groups), -g[0]))
        return per_token * tokens + per_call


@dataclass(frozen=True)
class Efficiency:
    """Fractions of datasheet peaks that the roofline fallback assumes real kernels reach."""

    mem: float = 0.8  # KV and weight reads
    compute: float = 0.7  # bf16 GEMMs
    kernel_overhead_s: float = 20e-6  # launches per layer per micro-batch, each side
    allreduce_latency_s: float = 10e-6


def attn_time_s(b_a: float, avg_seq_len: float, c: AttnCoeffs) -> float:
    return c.k1_s(avg_seq_len) * b_a + c.k2_s


def expert_time_s(pairs: float, experts_held: float, c: ExpertCoeffs) -> float:
    return c.k3_s_per_token * pairs + c.k4_s_per_expert * experts_held + c.overhead_s


def allreduce_time_s(nbytes: float, tp: int, intra_gb_per_s: float, latency_s: float) -> float:
    """Ring all-reduce inside a tensor-parallel group; zero without tensor parallelism."""
    return 0.0 if tp == 1 else 2 * (tp - 1) / tp * nbytes / (intra_gb_per_s * 1e9) + latency_s


def roofline_attn_coeffs(shape: MoEShape, gpu: GPU, tp: int, eff: Efficiency = Efficiency()) -> AttnCoeffs:
    """k1, k2 from datasheet peaks: weights read once per micro-batch (k2), per token the
    projection FLOPs and the o_proj all-reduce (k1_tok), per context token the larger of the
    KV read and the score FLOPs (k1_ctx; kv heads replicate once tp exceeds them)."""
    bw, flops = gpu.mem_bw_gb_per_s * 1e9 * eff.mem, gpu.bf16_tflops * 1e12 * eff.compute
    kv_shards = min(tp, shape.num_kv_heads)
    k1_ctx = max(shape.kv_bytes_per_token_layer / kv_shards / bw, shape.attn_flops_per_ctx_token / tp / flops)
    k1_tok = shape.attn_flops_per_token / tp / flops + allreduce_time_s(shape.row_bytes, tp, gpu.intra_gb_per_s, 0)
    k2 = shape.attn_layer_bytes / tp / bw + eff.kernel_overhead_s + (eff.allreduce_latency_s if tp > 1 else 0)
    return AttnCoeffs(k1_tok, k1_ctx, k2, source="roofline")


def roofline_expert_coeffs(shape: MoEShape, gpu: GPU, tp: int, eff: Efficiency = Efficiency()) -> ExpertCoeffs:
    """k3 (FLOPs + all-reduce per pair), k4 (one expert's layer weights read) from datasheet peaks."""
    bw, flops = gpu.mem_bw_gb_per_s * 1e9 * eff.mem, gpu.bf16_tflops * 1e12 * eff.compute
    k3 = shape.expert_flops_per_token / tp / flops + allreduce_time_s(shape.row_bytes, tp, gpu.intra_gb_per_s, 0)
    k4 = shape.expert_layer_bytes / tp / bw
    overhead = eff.kernel_overhead_s + (eff.allreduce_latency_s if tp > 1 else 0)
    return ExpertCoeffs(k3, k4, overhead, source="roofline")


def util_at(curve: UtilCurve, msg_bytes: float) -> float:
    """Link utilisation at a message size: linear in log(size) between points, clamped at the ends."""
    sizes = [p[0] for p in curve]
    if msg_bytes <= sizes[0]:
        return curve[0][1]
    if msg_bytes >= sizes[-1]:
        return curve[-1][1]
    i = bisect.bisect_right(sizes, msg_bytes)
    (x0, u0), (x1, u1) = curve[i - 1], curve[i]
    w = (math.log(msg_bytes) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return u0 + w * (u1 - u0)


def transfer_time_s(nbytes: float, link_gb_per_s: float, curve: UtilCurve) -> float:
    """One side of a transfer: bytes over the link at the utilisation for that size."""
    if nbytes <= 0:
        return 0.0
    return nbytes / (link_gb_per_s * 1e9 * util_at(curve, nbytes))


def group_hit_prob(num_experts: int, top_k: int, experts_in_group: int) -> float:
    """Probability that a token's K distinct (uniformly routed) experts include one of the group's."""
    return 1.0 - math.comb(num_experts - experts_in_group, top_k) / math.comb(num_experts, top_k)


def experts_per_group(num_experts: int, n_e: int) -> list[int]:
    """Experts held by each of n_e groups, as even as possible (sizes differ by at most 1)."""
    base, extra = divmod(num_experts, n_e)
    return [base + (1 if g < extra else 0) for g in range(n_e)]


def groups_per_token(num_experts: int, top_k: int, n_e: int) -> float:
    """Expected rows a token sends (one per distinct expert group it is routed to); K when n_e = E."""
    return sum(group_hit_prob(num_experts, top_k, c) for c in experts_per_group(num_experts, n_e))


def step_time_s(t_a_s: float, t_e_s: float, t_c_s: float, m: int, num_layers: int) -> float:
    """Whole-step latency of the ping-pong pipeline.

    A layer takes each micro-batch T_a + T_e + 2T_c around the loop, and each resource (the two
    sides and the links) needs m·T_b per layer for all micro-batches, T_b = max(T_a, T_e, T_c), so
    a layer's period is P = max(m·T_b, T_a + T_e + 2T_c) and the step
    (L-1)·P + (T_a + T_e + 2T_c) + (m-1)·T_b. With the pipeline full (eq. 3:
    m >= 2(1 + T_c/T_f)) this is eq. 5, (T_a + T_e + 2T_c) + T_f·(m·L - 1); with m = 1 it is
    L·(T_a + T_e + 2T_c) (nothing overlaps). Equal to the simulator's replay of the schedule with
    uniform costs in every regime (tests/planner/test_simulator.py)."""
    t_b, loop = max(t_a_s, t_e_s, t_c_s), t_a_s + t_e_s + 2 * t_c_s
    return (num_layers - 1) * max(m * t_b, loop) + loop + (m - 1) * t_b


def step_time_lower_bound_s(t_a_s: float, t_e_s: float, t_c_s: float, m: int, num_layers: int) -> float:
    """A lower bound on any step: eq. 5 with T_f = max(T_a, T_e, T_c).

    Each of the four resources (attention, expert, and the two links) must run its m·L ops
    one after another, after at least the ops that precede its first and before the ops that
    follow its last; the busiest one bounds the step. Equals eq. 5 when T_c <= T_f.
    """
    return (t_a_s + t_e_s + 2 * t_c_s) + max(t_a_s, t_e_s, t_c_s) * (m * num_layers - 1)


def iter_latency_bounds_s(t_a_s: float, t_e_s: float, t_c_s: float, m: int, num_layers: int) -> tuple[float, float]:
    """Eq. 4: bounds on one micro-batch's latency through all layers."""
    t_f = max(t_a_s, t_e_s)
    return (t_a_s + t_e_s + 2 * t_c_s) + m * t_f * (num_layers - 1), m * t_f * num_layers


def min_micro_batches(t_a_s: float, t_e_s: float, t_c_s: float) -> float:
    """Eq. 3: the pipeline is full when m >= 2(1 + T_c/T_f)."""
    return 2 * (1 + t_c_s / max(t_a_s, t_e_s))


def pipeline_conditions(t_a_s: float, t_e_s: float, t_c_s: float, m: int, balance_tol: float = 0.2) -> dict:
    """The three ping-pong conditions of DESIGN.md §4 (balance within ``balance_tol`` of T_f)."""
    t_f = max(t_a_s, t_e_s)
    return {"balanced": abs(t_a_s - t_e_s) <= balance_tol * t_f, "comm_hidden": t_c_s < t_f,
            "enough_micro_batches": m >= min_micro_batches(t_a_s, t_e_s, t_c_s)}


def balanced_attn_groups(k1_s: float, k3_s: float, num_experts: int, top_k: int) -> float:
    """The paper's balance rule n_a ≈ k1·E / (k3·K) (one expert per group, b_a large)."""
    return k1_s * num_experts / (k3_s * top_k)


def kv_bytes_per_seq(shape: MoEShape, avg_seq_len: float, tp: int = 1) -> float:
    """KV of one sequence over all layers on a tp group (kv heads replicate once tp exceeds them)."""
    replication = max(1.0, tp / shape.num_kv_heads)
    return avg_seq_len * shape.num_layers * shape.kv_bytes_per_token_layer * replication


def attn_memory_bytes(shape: MoEShape, m: int, b_a: int, avg_seq_len: float, tp: int = 1) -> float:
    """Eq. 8 in bytes: KV of m·b_a sequences of length s over all layers, plus P_a."""
    return m * b_a * kv_bytes_per_seq(shape, avg_seq_len, tp) + shape.attn_params_bytes


def expert_memory_bytes(shape: MoEShape, experts_held: int) -> float:
    return experts_held * shape.expert_bytes


def usable_bytes(gpu: GPU, tp: int, usable_fraction: float) -> float:
    """Memory of a tp-GPU group left for weights and KV (the rest: activations, buffers, runtime)."""
    return tp * gpu.memory_bytes * usable_fraction


@dataclass(frozen=True)
class AfdLayout:
    """The parallel sizes of one disaggregated deployment."""

    tp_a: int  # GPUs per attention group
    n_a: int  # attention groups
    tp_e: int  # GPUs per expert group
    n_e: int  # expert groups (each holds about E/n_e experts of every layer)
    m: int  # micro-batches

    @property
    def num_gpus(self) -> int:
        return self.tp_a * self.n_a + self.tp_e * self.n_e


@dataclass(frozen=True)
class Hardware:
    """What one side of the model runs on: GPU type, its coefficients and the link curve."""

    attn_gpu: GPU
    expert_gpu: GPU
    attn: AttnCoeffs  # for the layout's tp_a
    expert: ExpertCoeffs  # for the layout's tp_e
    util_curve: UtilCurve = DEFAULT_UTIL_CURVE
    route: RouteCoeffs = RouteCoeffs()  # on the attention GPU


def afd_stage_times_s(shape: MoEShape, lay: AfdLayout, hw: Hardware, b_a: float,
                      avg_seq_len: float) -> tuple[float, float, float]:
    """(T_a, T_e, T_c) per layer and micro-batch under uniform routing; T_a includes splitting
    the micro-batch's rows by expert group (``hw.route``).

    T_e is that of the busiest expert group: the one holding ceil(E/n_e) experts, which gets
    b_a·n_a·K·c/E (token, expert) pairs. T_c is eq. 6 in bytes, the slower of the attention
    GPU sending b_a·rows_per_token·row_bytes/tp_a and the expert GPU receiving its share.
    """
    held = math.ceil(shape.num_experts / lay.n_e)
    t_a = attn_time_s(b_a, avg_seq_len, hw.attn) + hw.route.time_s(b_a, lay.n_e)
    pairs = b_a * lay.n_a * shape.top_k * held / shape.num_experts
    t_e = expert_time_s(pairs, held, hw.expert)
    send_bytes = b_a * groups_per_token(shape.num_experts, shape.top_k, lay.n_e) * shape.row_bytes / lay.tp_a
    recv_rows = b_a * lay.n_a * group_hit_prob(shape.num_experts, shape.top_k, held)
    recv_bytes = recv_rows * shape.row_bytes / lay.tp_e
    t_c = max(transfer_time_s(send_bytes, hw.attn_gpu.net_gb_per_s, hw.util_curve),
              transfer_time_s(recv_bytes, hw.expert_gpu.net_gb_per_s, hw.util_curve))
    return t_a, t_e, t_c
