"""A small max-flow (Edmonds-Karp) for splitting replicated experts' tokens over groups."""

from __future__ import annotations

from collections import deque

import torch


def max_flow_value(holders: dict[int, list[int]], loads_E: torch.Tensor,
                   capacity_G: list[float]) -> tuple[float, dict[tuple[int, int], float]]:
    """Flow source -> expert e (its load) -> each group holding e -> sink (``capacity_G[g]``
    into the sink from group g). Returns (flow value, flow on each (expert, group) edge)."""
    experts, num_groups = sorted(holders), len(capacity_G)
    src, sink = 0, 1 + len(experts) + num_groups
    node = {e: 1 + i for i, e in enumerate(experts)}
    cap: dict[tuple[int, int], float] = {}
    adj: dict[int, list[int]] = {}

    def edge(u: int, v: int, c: float) -> None:
        cap[(u, v)] = cap.get((u, v), 0.0) + c
        cap.setdefault((v, u), 0.0)
        adj.setdefault(u, []).append(v)
        adj.setdefault(v, []).append(u)

    for e in experts:
        edge(src, node[e], float(loads_E[e]))
        for g in holders[e]:
            edge(node[e], 1 + len(experts) + g, float("inf"))
    for g in range(num_groups):
        edge(1 + len(experts) + g, sink, max(capacity_G[g], 0.0))
    total = 0.0
    while (path := _augmenting_path(adj, cap, src, sink)) is not None:
        push = min(cap[(u, v)] for u, v in path)
        for u, v in path:
            cap[(u, v)] -= push
            cap[(v, u)] += push
        total += push
    flows = {(e, g): cap[(1 + len(experts) + g, node[e])] for e in experts for g in holders[e]}
    return total, flows


def _augmenting_path(adj, cap, src: int, sink: int) -> list[tuple[int, int]] | None:
    parent = {src: None}
    queue = deque([src])
    while queue:
        u = queue.popleft()
        for v in adj.get(u, ()):
            if v not in parent and cap[(u, v)] > 1e-12:
                parent[v] = u
                if v == sink:
                    path = []
                    while parent[v] is not None:
                        path.append((parent[v], v))
                        v = parent[v]
                    return path[::-1]
                queue.append(v)
    return None
