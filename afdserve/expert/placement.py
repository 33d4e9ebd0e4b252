"""Which expert lives on which expert group, and in which local slot there (pure functions).

Legend: E experts, G expert groups, S local slots of a group.

For now every layer has the same placement and each expert has exactly one home. A later
issue adds per-layer maps with redundant replicas (``group_of_expert_LE``-style arrays); the
``for_layer`` accessor is the seam callers already use, so that change stays local.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    _lookup: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

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

    def lookup_E2(self, device: torch.device | str) -> torch.Tensor:
        """int64 [E, 2] table of (group, slot) per expert on ``device``, built once per device."""
        key = str(device)
        if key not in self._lookup:
            table = torch.tensor(list(zip(self.group_of_expert, self.slot_of_expert)), dtype=torch.int64)
            self._lookup[key] = table.view(self.num_experts, 2).to(device)
        return self._lookup[key]


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
