"""Fast replay of the ping-pong schedule: both op lists of ``afdserve.pipeline`` walked in
lockstep, each op applied to every node of its role at once (numpy over nodes).

Why this equals a per-node event simulation: every node of a role runs the same op list,
and the only coupling between nodes is the M2N barrier (a RECEIVE needs the DISPATCH of
every attention node, a COMBINE the REPLY of every expert node), whose ready time is the
max over the senders' transfer ends. So an op can be applied to all nodes of a role in one
vector step, and when all nodes of a role are identical (scalar costs) a single
representative node in plain Python arithmetic (exact with ``fractions.Fraction``) suffices.
``events.replay_events`` is the straightforward per-node event replay it is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from afdserve.pipeline import OpKind, attention_schedule, expert_schedule
from afdserve.simulator.costs import SimCosts

ATTN, DISPATCH, COMBINE, RECEIVE, EXPERT, REPLY = range(6)
_CODE = {OpKind.ATTN: ATTN, OpKind.DISPATCH: DISPATCH, OpKind.COMBINE: COMBINE,
         OpKind.RECEIVE: RECEIVE, OpKind.EXPERT: EXPERT, OpKind.REPLY: REPLY}


@lru_cache(maxsize=64)
def compiled_schedules(num_layers: int, m: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """pipeline.py's two op lists as (kind code, layer, micro-batch) tuples."""
    return tuple(tuple((_CODE[op.kind], op.layer, op.mb) for op in ops)
                 for ops in (attention_schedule(num_layers, m), expert_schedule(num_layers, m)))


@dataclass
class Trace:
    """Raw timings of a replay, seconds from the start of step 0 (n = 1 for a uniform replay)."""

    mb_start_s: np.ndarray  # (steps, n_a, m) start of ATTN(0, mb)
    mb_done_s: np.ndarray  # (steps, n_a, m) end of COMBINE(L-1, mb): the token's hidden state is ready
    step_end_s: np.ndarray  # (steps, n_a) after sampling
    attn_busy_s: np.ndarray  # (n_a,)
    expert_busy_s: np.ndarray  # (n_e,)
    attn_link_busy_s: np.ndarray  # (n_a,)
    expert_link_busy_s: np.ndarray  # (n_e,)
    expert_span_s: np.ndarray  # (n_e,) first EXPERT start to last EXPERT end
    attn_span_s: np.ndarray  # (n_a,) first ATTN start to last ATTN end


def replay_fast(c: SimCosts) -> Trace:
    """Replay ``c.steps`` global steps; vectorised over nodes, scalar when ``c.uniform``."""
    r = _Lockstep(c)
    a_total, e_total = len(r.a_ops) * c.steps, len(r.e_ops) * c.steps
    ai = ei = 0
    while ai < a_total or ei < e_total:
        before = (ai, ei)
        ai, ei = r.run_attn(ai), r.run_expert(ei)
        if (ai, ei) == before:
            raise RuntimeError(f"schedule deadlock at attention op {ai}, expert op {ei}")
    return r.trace()


class _Lockstep:
    def __init__(self, c: SimCosts):
        self.c, self.vec = c, not c.uniform
        self.a_ops, self.e_ops = compiled_schedules(c.num_layers, c.m)
        self.mx, self.rmax = (np.maximum, np.max) if self.vec else (max, lambda x: x)
        if self.vec:
            full = lambda x, shape: np.broadcast_to(np.asarray(x, dtype=float), shape)  # noqa: E731
            attn = full(c.attn_s, (c.steps, c.n_a, c.m))
            self.attn = [[np.ascontiguousarray(attn[s, :, i]) for i in range(c.m)] for s in range(c.steps)]
            expert = full(c.expert_s, (c.num_layers, c.n_e))
            self.expert = [np.ascontiguousarray(expert[layer]) for layer in range(c.num_layers)]
            self.a2e, self.e2a = full(c.a2e_s, (c.n_a,)).copy(), full(c.e2a_s, (c.n_e,)).copy()
            zero_a, zero_e = np.zeros(c.n_a), np.zeros(c.n_e)
        else:
            self.attn = [[c.attn_s] * c.m] * c.steps
            self.expert = [c.expert_s] * c.num_layers
            self.a2e, self.e2a = c.a2e_s, c.e2a_s
            zero_a = zero_e = c.attn_s - c.attn_s  # keeps the number type (Fraction stays exact)
        self.a_free = self.a_link = self.a_busy = self.a_link_busy = self.a_last = zero_a
        self.e_free = self.e_link = self.e_busy = self.e_link_busy = self.e_last = zero_e
        self.a_first = self.e_first = None
        self.disp: dict[tuple[int, int, int], object] = {}
        self.reply: dict[tuple[int, int, int], object] = {}
        self.start = [[None] * c.m for _ in range(c.steps)]
        self.done = [[None] * c.m for _ in range(c.steps)]
        self.step_end: list = [None] * c.steps

    def run_attn(self, ai: int) -> int:
        """Attention ops from index ``ai`` until a COMBINE whose replies are not all computed."""
        ops, n, last_layer = self.a_ops, len(self.a_ops), self.c.num_layers - 1
        while ai < n * self.c.steps:
            step, j = divmod(ai, n)
            kind, layer, mb = ops[j]
            if kind == COMBINE:
                ready = self.reply.get((step, layer, mb))
                if ready is None:
                    return ai
                self.a_free = self.mx(self.a_free, ready)
                if layer == last_layer:
                    self.done[step][mb] = self.a_free
                if j == n - 1:
                    if self.c.sample_s:
                        self.a_free = self.a_free + self.c.sample_s
                    self.step_end[step] = self.a_free
            elif kind == ATTN:
                if layer == 0:
                    self.start[step][mb] = self.a_free
                if self.a_first is None:
                    self.a_first = self.a_free
                d = self.attn[step][mb]
                self.a_free, self.a_busy = self.a_free + d, self.a_busy + d
                self.a_last = self.a_free
            else:  # DISPATCH: a transfer on this node's link; attention goes on
                self.a_link = self.mx(self.a_free, self.a_link) + self.a2e
                self.a_link_busy = self.a_link_busy + self.a2e
                self.disp[(step, layer, mb)] = self.rmax(self.a_link)
            ai += 1
        return ai

    def run_expert(self, ei: int) -> int:
        """Expert ops from index ``ei`` until a RECEIVE whose dispatches are not all computed."""
        ops, n = self.e_ops, len(self.e_ops)
        while ei < n * self.c.steps:
            step, j = divmod(ei, n)
            kind, layer, mb = ops[j]
            if kind == RECEIVE:
                ready = self.disp.get((step, layer, mb))
                if ready is None:
                    return ei
                self.e_free = self.mx(self.e_free, ready)
            elif kind == EXPERT:
                if self.e_first is None:
                    self.e_first = self.e_free
                d = self.expert[layer]
                self.e_free, self.e_busy = self.e_free + d, self.e_busy + d
                self.e_last = self.e_free
            else:  # REPLY
                self.e_link = self.mx(self.e_free, self.e_link) + self.e2a
                self.e_link_busy = self.e_link_busy + self.e2a
                self.reply[(step, layer, mb)] = self.rmax(self.e_link)
            ei += 1
        return ei

    def trace(self) -> Trace:
        per_node = (lambda x: np.asarray(x)) if self.vec else (lambda x: np.array([x]))
        stack = lambda rows: np.stack([np.stack([per_node(x) for x in row], axis=-1) for row in rows])  # noqa: E731
        return Trace(stack(self.start), stack(self.done), np.stack([per_node(x) for x in self.step_end]),
                     per_node(self.a_busy), per_node(self.e_busy), per_node(self.a_link_busy),
                     per_node(self.e_link_busy), per_node(self.e_last - self.e_first),
                     per_node(self.a_last - self.a_first))
