"""What the simulator replays the schedule with: the duration of every op on every node.

A scalar stands for "the same on every node"; arrays give per-node (and per-step, per-layer)
values, which is how routing skew and sequence-length spread enter. Builders here turn the
planner's performance model plus a skew and a length spread into these durations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from afdserve.planner.models import MoEShape
from afdserve.planner.perf_model import (
    AfdLayout,
    Hardware,
    experts_per_group,
    groups_per_token,
    transfer_time_s,
)

Cost = float | np.ndarray


@dataclass(frozen=True)
class SimCosts:
    """Op durations for ``steps`` global steps of ``num_layers`` layers and ``m`` micro-batches.

    attn_s:   ATTN on an attention node; scalar or (steps, n_a, m)
    expert_s: EXPERT on an expert node; scalar or (num_layers, n_e)
    a2e_s:    DISPATCH transfer from an attention node; scalar or (n_a,)
    e2a_s:    REPLY transfer from an expert node; scalar or (n_e,)
    sample_s: lm_head + sampling after the last COMBINE of a step (attention nodes)
    """

    num_layers: int
    m: int
    attn_s: Cost
    expert_s: Cost
    a2e_s: Cost
    e2a_s: Cost
    n_a: int = 1
    n_e: int = 1
    steps: int = 1
    sample_s: float = 0.0

    def __post_init__(self) -> None:
        want = {"attn_s": (self.steps, self.n_a, self.m), "expert_s": (self.num_layers, self.n_e),
                "a2e_s": (self.n_a,), "e2a_s": (self.n_e,)}
        for name, shape in want.items():
            value = getattr(self, name)
            if isinstance(value, np.ndarray) and value.shape != shape:
                raise ValueError(f"{name} has shape {value.shape}, expected {shape} or a scalar")

    @property
    def uniform(self) -> bool:
        """True when every node of a role behaves the same (all costs scalars)."""
        return not any(isinstance(v, np.ndarray) for v in (self.attn_s, self.expert_s, self.a2e_s, self.e2a_s))

    def attn_at(self, step: int, node: int, mb: int):
        return self.attn_s if not isinstance(self.attn_s, np.ndarray) else self.attn_s[step, node, mb]

    def expert_at(self, layer: int, node: int):
        return self.expert_s if not isinstance(self.expert_s, np.ndarray) else self.expert_s[layer, node]

    def a2e_at(self, node: int):
        return self.a2e_s if not isinstance(self.a2e_s, np.ndarray) else self.a2e_s[node]

    def e2a_at(self, node: int):
        return self.e2a_s if not isinstance(self.e2a_s, np.ndarray) else self.e2a_s[node]


def zipf_expert_load(num_experts: int, top_k: int, alpha: float) -> np.ndarray:
    """Share of a layer's (token, expert) picks that each expert gets, hottest first.

    p_e ∝ 1/(e+1)^alpha (alpha = 0: uniform), then capped at 1/K (an expert can take each
    token at most once) by moving the excess to the others in proportion to their share.
    """
    p = 1.0 / np.arange(1, num_experts + 1) ** alpha
    p /= p.sum()
    cap = 1.0 / top_k
    for _ in range(num_experts):
        over = p > cap + 1e-15
        if not over.any():
            break
        excess = (p[over] - cap).sum()
        p[over] = cap
        free = ~over & (p < cap)
        p[free] += excess * p[free] / p[free].sum()
    return p


@dataclass(frozen=True)
class Workload:
    """What the runtime would see: batch per micro-batch, context lengths, routing."""

    b_a: int  # sequences (decode tokens) per micro-batch per attention group
    avg_seq_len: float
    seq_len_cv: float = 0.0  # coefficient of variation of context lengths (gamma-distributed)
    expert_load: np.ndarray | None = None  # (E,) or (L, E) pick shares; None: uniform
    steps: int = 1
    sample_s: float = 0.0
    seed: int = 0
    # a placement with replicas (afdserve.expert): (L, G) share of the picks each group gets and
    # (G,) expert slots each group holds; None: contiguous placement of expert_load
    group_share: np.ndarray | None = None
    slots_held: np.ndarray | None = None


def build_costs(shape: MoEShape, lay: AfdLayout, hw: Hardware, wl: Workload) -> SimCosts:
    """Op durations from the performance model (scalars when skew and spread are both absent)."""
    attn_s = _attn_costs(shape, lay, hw, wl)
    expert_s, rows_per_group = _expert_costs(shape, lay, hw, wl)
    send_a = wl.b_a * groups_per_token(shape.num_experts, shape.top_k, lay.n_e) * shape.row_bytes / lay.tp_a
    t_a_side = transfer_time_s(send_a, hw.attn_gpu.net_gb_per_s, hw.util_curve)
    t_e_side = np.array([transfer_time_s(r * shape.row_bytes / lay.tp_e, hw.expert_gpu.net_gb_per_s, hw.util_curve)
                         for r in rows_per_group])
    # an M2N transfer is done when its slowest end is: the busiest expert group bounds A2E
    a2e_s, e2a_s = max(t_a_side, float(t_e_side.max())), np.maximum(t_e_side, t_a_side)
    if np.ndim(attn_s) == 0 and np.ndim(expert_s) == 0:
        return SimCosts(shape.num_layers, lay.m, float(attn_s), float(expert_s), a2e_s, float(e2a_s[0]),
                        lay.n_a, lay.n_e, wl.steps, wl.sample_s)
    return SimCosts(shape.num_layers, lay.m, _full(attn_s, (wl.steps, lay.n_a, lay.m)),
                    _full(expert_s, (shape.num_layers, lay.n_e)), np.full(lay.n_a, a2e_s), e2a_s,
                    lay.n_a, lay.n_e, wl.steps, wl.sample_s)


def with_placement(wl: Workload, num_experts: int, n_e: int, redundant: int = 0) -> Workload:
    """``wl`` with its expert load placed the way the runtime places it: contiguous homes for
    uniform load; for a skewed load, ``afdserve.expert.balance`` with ``redundant`` spare slots
    (group shares and the slots each group then holds)."""
    if wl.expert_load is None and redundant == 0:
        return wl
    load = np.ones(num_experts) if wl.expert_load is None else np.asarray(wl.expert_load, dtype=float)
    share, held = _placed_shares(np.atleast_2d(load).tobytes(), np.atleast_2d(load).shape, n_e, redundant)
    return replace(wl, group_share=share, slots_held=held)


@functools.lru_cache(maxsize=256)
def _placed_shares(load_bytes: bytes, shape: tuple[int, int], n_e: int, redundant: int):
    """(L, G) pick shares and (G,) slots held under the runtime's placement (cached: the
    search asks for the same load and n_e at many batch sizes)."""
    import torch

    from afdserve.expert.balance import balanced_placement, group_loads

    load_LE = torch.from_numpy(np.frombuffer(load_bytes, dtype=np.float64).reshape(shape).copy())
    num_experts = shape[1]
    slots = -(-(num_experts + redundant) // n_e)
    phy2log, share = balanced_placement(load_LE, n_e, slots, num_experts + redundant)
    gl = group_loads(phy2log, share, load_LE, slots).numpy()
    held = (phy2log.view(phy2log.shape[0], n_e, slots) >= 0).sum(-1).max(0).values.numpy()
    return gl / gl.sum(-1, keepdims=True), held


def _attn_costs(shape: MoEShape, lay: AfdLayout, hw: Hardware, wl: Workload) -> Cost:
    """T_a per (step, node, micro-batch): k1_tok·b_a + k1_ctx·(sum of its contexts) + k2, plus
    splitting the rows by expert group (``hw.route``).

    Context lengths are drawn once per sequence and grow by one token per step.
    """
    c, route = hw.attn, hw.route.time_s(wl.b_a, lay.n_e)
    if wl.seq_len_cv == 0:
        return c.k1_s(wl.avg_seq_len) * wl.b_a + c.k2_s + route
    rng = np.random.default_rng(wl.seed)
    k = 1.0 / wl.seq_len_cv ** 2
    lens = rng.gamma(k, wl.avg_seq_len / k, size=(lay.n_a, lay.m, wl.b_a)).sum(axis=-1)
    ctx = lens[None] + wl.b_a * np.arange(wl.steps)[:, None, None]
    return c.k1_s_per_token * wl.b_a + c.k1_s_per_token_ctx * ctx + c.k2_s + route


def _expert_costs(shape: MoEShape, lay: AfdLayout, hw: Hardware, wl: Workload) -> tuple[Cost, np.ndarray]:
    """T_e per (layer, expert group) and rows each group receives (busiest layer).

    Experts are placed contiguously (group 0 holds experts 0..c-1, ...); a group's pairs are
    its experts' shares of the b_a·n_a·K picks; its rows are pairs scaled by rows/pairs of
    uniform routing (exact without skew).
    """
    held = np.array(experts_per_group(shape.num_experts, lay.n_e))
    picks = wl.b_a * lay.n_a * shape.top_k
    rows_per_pair = groups_per_token(shape.num_experts, shape.top_k, lay.n_e) / shape.top_k
    if wl.expert_load is None:
        load_LE = np.full((1, shape.num_experts), 1.0 / shape.num_experts)
    else:
        load_LE = np.atleast_2d(np.asarray(wl.expert_load, dtype=float))
    if wl.group_share is not None:
        share_LG = np.atleast_2d(np.asarray(wl.group_share, dtype=float))
        held = np.asarray(wl.slots_held if wl.slots_held is not None else held)
    else:
        bounds = np.concatenate([[0], np.cumsum(held)])
        share_LG = np.add.reduceat(load_LE, bounds[:-1], axis=1)
    pairs_LG = picks * share_LG
    c = hw.expert
    t_LG = c.k3_s_per_token * pairs_LG + c.k4_s_per_expert * held[None] + c.overhead_s
    rows = pairs_LG.max(axis=0) * rows_per_pair
    if wl.expert_load is None and wl.group_share is None and len(set(held.tolist())) == 1:
        return float(t_LG[0, 0]), rows
    if t_LG.shape[0] == 1:
        t_LG = np.repeat(t_LG, shape.num_layers, axis=0)
    return t_LG, rows


def _full(x: Cost, shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.asarray(x, dtype=float), shape).copy()


def uniform_costs(num_layers: int, m: int, t_a_s, t_e_s, t_c_s, n_a: int = 1, n_e: int = 1,
                  steps: int = 1) -> SimCosts:
    """The ideal case: constant T_a, T_e, T_c on every node (any number type, e.g. Fraction)."""
    return SimCosts(num_layers, m, t_a_s, t_e_s, t_c_s, t_c_s, n_a, n_e, steps)
