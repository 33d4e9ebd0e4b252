"""The straightforward discrete-event replay: every attention node, expert node and link is
simulated on its own from ``afdserve.pipeline``'s op lists. Slow (a heap event per op per
node), so it is the reference that ``replay.replay_fast`` is tested against on small cases.

A node runs its ops in order: ATTN/EXPERT occupy it for their duration; DISPATCH/REPLY put
a transfer on the node's link (FIFO, one at a time) and the node goes on; COMBINE/RECEIVE
block until the message of every sender of that (step, layer, micro-batch) has arrived.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

from afdserve.simulator.costs import SimCosts
from afdserve.simulator.replay import ATTN, COMBINE, DISPATCH, EXPERT, REPLY, Trace, compiled_schedules

_RESUME, _ARRIVE = 0, 1


def replay_events(c: SimCosts) -> Trace:
    """Replay ``c.steps`` global steps node by node; works with any number type (e.g. Fraction)."""
    sim = _EventSim(c)
    sim.run()
    return sim.trace()


class _EventSim:
    def __init__(self, c: SimCosts):
        self.c = c
        a_ops, e_ops = compiled_schedules(c.num_layers, c.m)
        self.nodes = [("attn", a, a_ops) for a in range(c.n_a)] + [("expert", e, e_ops) for e in range(c.n_e)]
        zero = c.attn_at(0, 0, 0) * 0
        n = len(self.nodes)
        self.pc, self.link_free = [0] * n, [zero] * n
        self.busy, self.link_busy = [zero] * n, [zero] * n
        self.first, self.last = [None] * n, [zero] * n
        self.arrived: dict[tuple, int] = {}
        self.arrived_at: dict[tuple, object] = {}
        self.waiting: dict[tuple, list[int]] = {}
        self.heap: list = []
        self.seq = itertools.count()
        steps, n_a, m = c.steps, c.n_a, c.m
        self.start = np.empty((steps, n_a, m), dtype=object)
        self.done = np.empty((steps, n_a, m), dtype=object)
        self.step_end = np.empty((steps, n_a), dtype=object)

    def push(self, t, kind: int, payload) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, payload))

    def run(self) -> None:
        for node in range(len(self.nodes)):
            self.push(self.c.attn_at(0, 0, 0) * 0, _RESUME, node)
        while self.heap:
            t, _, kind, payload = heapq.heappop(self.heap)
            if kind == _ARRIVE:
                self.arrive(t, payload)
            else:
                self.advance(payload, t)
        stuck = [i for i, (_, _, ops) in enumerate(self.nodes) if self.pc[i] < len(ops) * self.c.steps]
        if stuck:
            raise RuntimeError(f"schedule deadlock: nodes {stuck} did not finish")

    def arrive(self, t, key: tuple) -> None:
        self.arrived[key] = self.arrived.get(key, 0) + 1
        self.arrived_at[key] = t
        if self.arrived[key] == (self.c.n_a if key[0] == "a2e" else self.c.n_e):
            for node in self.waiting.pop(key, []):
                self.push(t, _RESUME, node)

    def advance(self, node: int, t) -> None:
        """Run the node's ops from time t until it computes or blocks."""
        role, idx, ops = self.nodes[node]
        while self.pc[node] < len(ops) * self.c.steps:
            step, j = divmod(self.pc[node], len(ops))
            kind, layer, mb = ops[j]
            if kind in (ATTN, EXPERT):
                self.compute(node, t, step, kind, layer, mb)
                return
            if kind in (DISPATCH, REPLY):  # a transfer on the node's link; the node goes on
                self.transfer(node, t, ("a2e" if kind == DISPATCH else "e2a", step, layer, mb))
                continue
            key = ("e2a" if kind == COMBINE else "a2e", step, layer, mb)
            needed = self.c.n_e if kind == COMBINE else self.c.n_a
            if self.arrived.get(key, 0) < needed:
                self.waiting.setdefault(key, []).append(node)
                return
            t = max(t, self.arrived_at[key])
            self.pc[node] += 1
            if kind == COMBINE and self.after_combine(node, idx, t, step, layer, mb, j == len(ops) - 1):
                return

    def compute(self, node: int, t, step: int, kind: int, layer: int, mb: int) -> None:
        _, idx, _ = self.nodes[node]
        if kind == ATTN:
            d = self.c.attn_at(step, idx, mb)
            if layer == 0:
                self.start[step, idx, mb] = t
        else:
            d = self.c.expert_at(layer, idx)
        if self.first[node] is None:
            self.first[node] = t
        self.busy[node] += d
        self.last[node] = t + d
        self.pc[node] += 1
        self.push(t + d, _RESUME, node)

    def transfer(self, node: int, t, key: tuple) -> None:
        _, idx, _ = self.nodes[node]
        d = self.c.a2e_at(idx) if key[0] == "a2e" else self.c.e2a_at(idx)
        end = max(t, self.link_free[node]) + d
        self.link_free[node] = end
        self.link_busy[node] += d
        self.pc[node] += 1
        self.push(end, _ARRIVE, key)

    def after_combine(self, node: int, idx: int, t, step: int, layer: int, mb: int, step_over: bool) -> bool:
        """Record a finished micro-batch / step; True when the node pauses for sampling."""
        if layer == self.c.num_layers - 1:
            self.done[step, idx, mb] = t
        if not step_over:
            return False
        if self.c.sample_s:
            t = t + self.c.sample_s
        self.step_end[step, idx] = t
        if self.c.sample_s:
            self.push(t, _RESUME, node)
            return True
        return False

    def trace(self) -> Trace:
        n_a = self.c.n_a
        arr = lambda xs: np.array(xs, dtype=object)  # noqa: E731
        span = [last - first for first, last in zip(self.first, self.last)]
        return Trace(self.start, self.done, self.step_end, arr(self.busy[:n_a]), arr(self.busy[n_a:]),
                     arr(self.link_busy[:n_a]), arr(self.link_busy[n_a:]), arr(span[n_a:]), arr(span[:n_a]))
