"""Which expert lives on which expert group, and in which local slot there (pure functions).

Legend: E experts, G expert groups, S local slots of a group.

``ExpertPlacement``: every layer alike, each expert in exactly one home.
``LayeredPlacement``: one ``ReplicaPlacement`` per layer, hot experts with redundant copies
(built by ``afdserve.expert.balance``). Callers use ``for_layer(l)``, then ``num_groups``,
``experts_of_group(g)`` and ``assign(topk_ids_TK)`` on what it returns.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """Home of every expert: ``group_of_expert[e]`` and ``slot_of_expert[e]`` (both length E).

    The slots of a group are 0..S_g-1 without gaps, so an expert group stores its experts as
    stacked weights ``w_[S_g, ...]`` in slot order and the attention side sends local slots.
    """

    num_groups: int
    group_of_expert: tuple[int, ...]
    slot_of_expert: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_groups < 1:
            raise ValueError(f"an expert placement needs >= 1 expert group, got {self.num_groups}")
        if len(self.group_of_expert) != len(self.slot_of_expert):
            raise ValueError(f"group_of_expert has {len(self.group_of_expert)} entries but slot_of_expert "
                             f"has {len(self.slot_of_expert)}")
        for g in range(self.num_groups):
            slots = sorted(s for s, h in zip(self.slot_of_expert, self.group_of_expert) if h == g)
            if slots != list(range(len(slots))):
                raise ValueError(f"expert group {g} has local slots {slots}; they must be 0..n-1 without gaps")
        bad = [g for g in self.group_of_expert if not 0 <= g < self.num_groups]
        if bad:
            raise ValueError(f"expert groups {bad} are out of range [0, {self.num_groups})")

    @property
    def num_experts(self) -> int:
        return len(self.group_of_expert)

    def experts_of_group(self, group: int) -> list[int]:
        """Global ids of the experts held by ``group``, in local slot order."""
        if not 0 <= group < self.num_groups:
            raise ValueError(f"expert group {group} is out of range [0, {self.num_groups})")
        held = [(s, e) for e, (g, s) in enumerate(zip(self.group_of_expert, self.slot_of_expert)) if g == group]
        return [e for _, e in sorted(held)]

    def num_local(self, group: int) -> int:
        """S_g: how many experts ``group`` holds."""
        return len(self.experts_of_group(group))

    def for_layer(self, layer: int) -> ExpertPlacement:
        """The placement of ``layer`` (the same for every layer until replicas arrive)."""
        return self

    def assign(self, topk_ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(group_TK, slot_TK) of each routed (token, choice); -1 for both where the id is -1
        (a padding row of a CUDA graph chose no expert)."""
        ids = topk_ids_TK.long()
        home_TK2 = self.lookup_E2(topk_ids_TK.device)[ids.clamp(min=0)]
        return _none_where_unrouted(ids, home_TK2[..., 0], home_TK2[..., 1])

    def device_tables(self, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        """The tables ``assign`` reads on ``device`` (a CUDA graph that captured ``assign``
        holds their addresses: its owner keeps them alive)."""
        return (self.lookup_E2(device),)

    def lookup_E2(self, device: torch.device | str) -> torch.Tensor:
        """int64 [E, 2] table of (group, slot) per expert on ``device``, built once per device."""
        return _home_table(self, str(device))


def contiguous_placement(num_experts: int, num_groups: int) -> ExpertPlacement:
    """Split experts 0..E-1 into ``num_groups`` contiguous runs as evenly as possible.

    No divisibility is needed: the first ``E % G`` groups hold one expert more, e.g.
    E=8, G=3 gives groups of sizes 3, 3, 2 holding experts [0,1,2], [3,4,5], [6,7].
    Requires 1 <= G <= E so that every group holds at least one expert.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= num_groups <= num_experts:
        raise ValueError(f"the number of expert groups must be in 1..{num_experts} (the number of experts), "
                         f"got {num_groups}")
    base, extra = divmod(num_experts, num_groups)
    groups: list[int] = []
    slots: list[int] = []
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        groups += [g] * size
        slots += list(range(size))
    return ExpertPlacement(num_groups, tuple(groups), tuple(slots))


_GOLDEN = 0.6180339887498949


@dataclass(frozen=True)
class ReplicaPlacement:
    """One layer with redundant copies: physical slot p = g*S + s holds expert ``phy2log[p]``
    (-1: empty; a group's used slots come first) and takes ``share[p]`` of its tokens.

    A (token, choice) pair goes to one replica, picked by a low-discrepancy sequence over
    the pair's index so that replicas receive their shares of the tokens, deterministically.
    """

    num_groups: int
    slots_per_group: int
    phy2log: tuple[int, ...]
    share: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.phy2log) != self.num_groups * self.slots_per_group or len(self.share) != len(self.phy2log):
            raise ValueError(f"phy2log/share need {self.num_groups}x{self.slots_per_group} entries, "
                             f"got {len(self.phy2log)}/{len(self.share)}")
        for g in range(self.num_groups):
            row = self.phy2log[g * self.slots_per_group:(g + 1) * self.slots_per_group]
            used = [e for e in row if e >= 0]
            if list(row[:len(used)]) != used or len(set(used)) != len(used):
                raise ValueError(f"expert group {g}: slots {list(row)} must hold distinct experts, used slots first")

    @property
    def num_experts(self) -> int:
        return max(self.phy2log) + 1

    def experts_of_group(self, group: int) -> list[int]:
        row = self.phy2log[group * self.slots_per_group:(group + 1) * self.slots_per_group]
        return [e for e in row if e >= 0]

    def assign(self, topk_ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(group_TK, slot_TK): each pair's replica, chosen by its share (-1 where the id is -1)."""
        phys_ER, cum_ER = _replica_tables(self, str(topk_ids_TK.device))
        t, k = topk_ids_TK.shape
        idx_TK = torch.arange(t * k, device=topk_ids_TK.device).view(t, k) + 1
        u_TK = torch.frac(idx_TK.double() * _GOLDEN)
        ids = topk_ids_TK.long()
        known = ids.clamp(min=0)
        j_TK = (u_TK[..., None] >= cum_ER[known]).sum(-1).clamp(max=phys_ER.shape[1] - 1)
        phys_TK = torch.gather(phys_ER[known], -1, j_TK[..., None])[..., 0]
        return _none_where_unrouted(ids, phys_TK // self.slots_per_group, phys_TK % self.slots_per_group)

    def device_tables(self, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        """The tables ``assign`` reads on ``device`` (a CUDA graph that captured ``assign``
        holds their addresses: its owner keeps them alive)."""
        return _replica_tables(self, str(device))


@dataclass(frozen=True)
class LayeredPlacement:
    """A ``ReplicaPlacement`` per layer; ``version`` counts live re-placements."""

    layers: tuple[ReplicaPlacement, ...]
    version: int = 0

    @property
    def num_groups(self) -> int:
        return self.layers[0].num_groups

    def for_layer(self, layer: int) -> ReplicaPlacement:
        return self.layers[layer]

    @staticmethod
    def from_tensors(phy2log_LP: torch.Tensor, share_LP: torch.Tensor, num_groups: int,
                     version: int = 0) -> LayeredPlacement:
        slots = phy2log_LP.shape[1] // num_groups
        return LayeredPlacement(tuple(ReplicaPlacement(num_groups, slots, tuple(p.tolist()), tuple(s.tolist()))
                                      for p, s in zip(phy2log_LP, share_LP)), version)


def _none_where_unrouted(ids_TK: torch.Tensor, group_TK: torch.Tensor, slot_TK: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    none_TK = ids_TK < 0
    return group_TK.masked_fill(none_TK, -1), slot_TK.masked_fill(none_TK, -1)


# Per-device lookup tables, cached by placement (frozen, hashable) and device. Placements
# themselves hold no tensors, so they pickle plainly when sent between processes.
@functools.lru_cache(maxsize=4096)
def _home_table(placement: ExpertPlacement, device: str) -> torch.Tensor:
    table = torch.tensor(list(zip(placement.group_of_expert, placement.slot_of_expert)), dtype=torch.int64)
    return table.view(placement.num_experts, 2).to(device)


@functools.lru_cache(maxsize=4096)
def _replica_tables(placement: ReplicaPlacement, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, R] physical slots of each expert's replicas and their cumulative shares
    (padded with the last replica and 2.0, which no draw reaches)."""
    reps: dict[int, list[tuple[int, float]]] = {}
    for p, (e, x) in enumerate(zip(placement.phy2log, placement.share)):
        if e >= 0:
            reps.setdefault(e, []).append((p, x))
    width = max(len(v) for v in reps.values())
    phys = torch.zeros(placement.num_experts, width, dtype=torch.int64)
    cum = torch.full((placement.num_experts, width), 2.0, dtype=torch.float64)
    for e, v in reps.items():
        total, acc = sum(x for _, x in v), 0.0
        for j in range(width):
            phys[e, j] = v[min(j, len(v) - 1)][0]
            if j < len(v) - 1:
                acc += v[j][1] / total
                cum[e, j] = acc
    return phys.to(device), cum.to(device)
