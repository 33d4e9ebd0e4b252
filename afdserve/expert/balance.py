"""Expert load balancing by redundant replicas (the paper's on-device redundancy, in the
manner of DeepSeek's EPLB): pure functions over per-layer expert loads.

Legend: L layers, E logical experts, G expert groups, S slots per group, P = G*S physical
slots. ``phy2log[l, p]`` is the logical expert in physical slot p (-1: empty; a group's used
slots come first); slot p lives on group p // S. ``share[l, p]`` is the fraction of its
expert's tokens that slot p takes (the paper's x_ij; a layer's shares of one expert sum to 1).
"""

from __future__ import annotations

import torch

from afdserve.expert.flow import max_flow_value


def replicate(loads_E: torch.Tensor, num_slots: int, max_replicas: int) -> torch.Tensor:
    """Replica count per expert minimising max(load / replicas): every expert gets one slot,
    each spare slot goes to the expert with the highest load per replica (water-filling,
    optimal for that min-max). No expert gets more than ``max_replicas`` (one per group)."""
    e = loads_E.numel()
    if num_slots < e:
        raise ValueError(f"{num_slots} slots cannot hold {e} experts")
    replicas = torch.ones(e, dtype=torch.int64)
    per = loads_E.double().clone()
    for _ in range(min(num_slots - e, e * (max_replicas - 1))):
        i = int(torch.argmax(torch.where(replicas < max_replicas, per, torch.full_like(per, -1.0))))
        replicas[i] += 1
        per[i] = loads_E[i].double() / replicas[i]
    return replicas


def _greedy(pieces: list[tuple[float, int]], num_groups: int, slots: int) -> list[list[tuple[float, int]]]:
    """Heaviest piece first onto the lightest group with a free slot and no copy of it."""
    groups: list[list[tuple[float, int]]] = [[] for _ in range(num_groups)]
    load = [0.0] * num_groups
    for w, e in sorted(pieces, key=lambda t: (-t[0], t[1])):
        g = min((g for g in range(num_groups) if len(groups[g]) < slots and all(x != e for _, x in groups[g])),
                key=lambda g: (load[g], g))
        groups[g].append((w, e))
        load[g] += w
    return groups


def _improve(groups: list[list[tuple[float, int]]], slots: int, max_rounds: int = 2000) -> None:
    """Local search: move or swap pieces out of the heaviest group while that lowers it."""
    for _ in range(max_rounds):
        load = [sum(w for w, _ in g) for g in groups]
        top = max(range(len(groups)), key=lambda g: load[g])
        best = _best_exchange(groups, load, top, slots)
        if best is None:
            return
        _, i, h, j = best
        piece = groups[top].pop(i)
        if j is not None:
            groups[top].append(groups[h].pop(j))
        groups[h].append(piece)


def _best_exchange(groups, load, top: int, slots: int):
    """(new max of the pair, piece index, other group, its piece index or None) or None."""
    best = None
    for i, (w, e) in enumerate(groups[top]):
        for h, other in enumerate(groups):
            if h == top or any(x == e for _, x in other):
                continue
            options = [(None, 0.0)] if len(other) < slots else []
            options += [(j, v) for j, (v, f) in enumerate(other) if v < w and all(x != f for _, x in groups[top])]
            for j, v in options:
                new_max = max(load[top] - w + v, load[h] + w - v)
                if new_max < load[top] - 1e-12 and (best is None or new_max < best[0]):
                    best = (new_max, i, h, j)
    return best


def _shares(groups: list[list[tuple[float, int]]], loads_E: torch.Tensor) -> list[list[float]]:
    """Split each replicated expert's load over its groups to minimise the heaviest group:
    binary search on the makespan with a max-flow feasibility test over the replicated
    experts only (a single copy takes its whole load)."""
    holders: dict[int, list[int]] = {}
    for g, pieces in enumerate(groups):
        for _, e in pieces:
            holders.setdefault(e, []).append(g)
    split = {e: gs for e, gs in holders.items() if len(gs) > 1}
    fixed_G = [sum(float(loads_E[e]) for _, e in pieces if e not in split) for pieces in groups]
    need = sum(float(loads_E[e]) for e in split)
    lo, hi = max(max(fixed_G), float(loads_E.sum()) / len(groups)), max(sum(w for w, _ in p) for p in groups)
    for _ in range(30):
        mid = (lo + hi) / 2
        if max_flow_value(split, loads_E, [mid - f for f in fixed_G])[0] >= need * (1 - 1e-9):
            hi = mid
        else:
            lo = mid
    _, flows = max_flow_value(split, loads_E, [hi - f for f in fixed_G])
    return [[flows[(e, g)] / max(float(loads_E[e]), 1e-30) if e in split else 1.0 for _, e in pieces]
            for g, pieces in enumerate(groups)]


def place_layer(loads_E: torch.Tensor, num_groups: int, slots_per_group: int,
                num_slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer: replicate into ``num_slots`` (default all G*S) slots, place greedily,
    improve by local search, then split replicated experts' tokens optimally.

    Returns (phy2log_P int64, share_P float64)."""
    num_slots = num_groups * slots_per_group if num_slots is None else num_slots
    replicas = replicate(loads_E, num_slots, num_groups)
    pieces = [(float(loads_E[e]) / int(replicas[e]), e) for e in range(loads_E.numel())
              for _ in range(int(replicas[e]))]
    groups = _greedy(pieces, num_groups, slots_per_group)
    _improve(groups, slots_per_group)
    shares = _shares(groups, loads_E) if int(replicas.max()) > 1 else [[1.0] * len(p) for p in groups]
    phy2log = torch.full((num_groups * slots_per_group,), -1, dtype=torch.int64)
    share = torch.zeros(num_groups * slots_per_group, dtype=torch.float64)
    for g, pieces_g in enumerate(groups):
        for s, ((_, e), x) in enumerate(zip(sorted(pieces_g, key=lambda t: t[1]), _by_expert(pieces_g, shares[g]))):
            phy2log[g * slots_per_group + s], share[g * slots_per_group + s] = e, x
    return phy2log, share


def _by_expert(pieces: list[tuple[float, int]], shares: list[float]) -> list[float]:
    return [x for (_, _), x in sorted(zip(pieces, shares), key=lambda t: t[0][1])]


def balanced_placement(loads_LE: torch.Tensor, num_groups: int, slots_per_group: int,
                       num_slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer placement for loads [L, E]: (phy2log_LP, share_LP). Any E, G, S with G*S >= E."""
    layers = [place_layer(row, num_groups, slots_per_group, num_slots) for row in loads_LE]
    return torch.stack([p for p, _ in layers]), torch.stack([s for _, s in layers])


def contiguous(num_layers: int, num_experts: int, num_groups: int, slots_per_group: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive baseline: experts in contiguous runs over groups, one copy each."""
    base, extra = divmod(num_experts, num_groups)
    row = torch.full((num_groups * slots_per_group,), -1, dtype=torch.int64)
    e = 0
    for g in range(num_groups):
        n = base + (1 if g < extra else 0)
        row[g * slots_per_group: g * slots_per_group + n] = torch.arange(e, e + n)
        e += n
    return row.repeat(num_layers, 1), (row >= 0).double().repeat(num_layers, 1)


def group_loads(phy2log_LP: torch.Tensor, share_LP: torch.Tensor, loads_LE: torch.Tensor,
                slots_per_group: int) -> torch.Tensor:
    """[L, G] load of every group under a placement."""
    num_layers, p = phy2log_LP.shape
    expert_load = torch.gather(loads_LE.double(), 1, phy2log_LP.clamp(min=0)) * (phy2log_LP >= 0)
    return (expert_load * share_LP).view(num_layers, p // slots_per_group, slots_per_group).sum(-1)


def lower_bound(loads_LE: torch.Tensor, num_groups: int, slots_per_group: int,
                num_slots: int | None = None) -> torch.Tensor:
    """[L] no placement's heaviest group is lighter: the mean group load; the heaviest
    expert split over its optimal replica count; and, when no slot is spare (nothing can be
    split), the heaviest expert plus the lightest ones that must share its full group."""
    num_slots = num_groups * slots_per_group if num_slots is None else num_slots
    out = []
    for loads_E in loads_LE.double():
        e = loads_E.numel()
        bound = max(float(loads_E.sum()) / num_groups,
                    float((loads_E / replicate(loads_E, num_slots, num_groups)).max()))
        must_share = e - (num_groups - 1) * slots_per_group - 1
        if num_slots == e and must_share > 0:
            ordered = torch.sort(loads_E).values
            bound = max(bound, float(ordered[-1] + ordered[:must_share].sum()))
        out.append(bound)
    return torch.tensor(out, dtype=torch.float64)


def balancedness(group_loads_G: torch.Tensor) -> float:
    """mean / max of group loads (1.0 = perfectly balanced)."""
    mx = float(group_loads_G.max())
    return float(group_loads_G.mean()) / mx if mx > 0 else 1.0


def zipf_loads(num_layers: int, num_experts: int, exponent: float, tokens: int = 100_000,
               seed: int = 0) -> torch.Tensor:
    """Synthetic skewed loads [L, E]: Zipf popularity over a random expert order per layer."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-exponent)
    p = p / p.sum()
    out = torch.empty(num_layers, num_experts, dtype=torch.float64)
    for layer in range(num_layers):
        out[layer, torch.randperm(num_experts, generator=gen)] = p * tokens
    return out
