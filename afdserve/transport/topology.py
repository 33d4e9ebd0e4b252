"""Who is who in a disaggregated deployment: global ranks of attention and expert groups.

Layout of the global ranks (DESIGN.md §2): attention groups first, then expert groups; the
tensor-parallel ranks of a group are consecutive. With n_a=2, tp_a=2, n_e=3, tp_e=1:

    rank  0 1 | 2 3 | 4 | 5 | 6
    role  a0  | a1  | e0| e1| e2      (tp rank 0 of each group is its leader)

Only leaders talk to the other side; the other TP ranks of a group get their inputs from the
leader through the group's TP process group (``groups.py``).

Colocated (``colocated=True``, vLLM/SGLang's "DP attention + expert parallel"): rank g is both
attention group g and expert group g (n_a = n_e, tp 1), so the world has n_a ranks and every
rank is a leader of both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["attn", "expert", "colocated"]


@dataclass(frozen=True)
class RankRole:
    """What one global rank does: its side, its group on that side, its rank inside the group."""

    role: Role
    group: int
    tp_rank: int

    @property
    def is_leader(self) -> bool:
        """The TP leader (tp rank 0) is the only rank of a group that uses the M2N transport."""
        return self.tp_rank == 0


@dataclass(frozen=True)
class Topology:
    """``n_a`` attention groups of ``tp_a`` ranks and ``n_e`` expert groups of ``tp_e`` ranks.

    Any positive sizes are allowed (no ``n_a % n_e`` rule); whether ``n_e`` fits the model's
    number of experts is checked by the expert placement.
    """

    n_a: int
    tp_a: int
    n_e: int
    tp_e: int
    colocated: bool = False

    def __post_init__(self) -> None:
        for name in ("n_a", "tp_a", "n_e", "tp_e"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Topology.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"Topology.{name} must be >= 1, got {value}")
        if self.colocated and (self.n_a != self.n_e or self.tp_a != 1 or self.tp_e != 1):
            raise ValueError(f"a colocated topology has one rank per group on both sides (n_a = n_e, tp 1), "
                             f"got n_a={self.n_a}, tp_a={self.tp_a}, n_e={self.n_e}, tp_e={self.tp_e}")

    @property
    def num_attn_ranks(self) -> int:
        return self.n_a * self.tp_a

    @property
    def num_expert_ranks(self) -> int:
        return self.n_e * self.tp_e

    @property
    def world_size(self) -> int:
        return self.num_attn_ranks if self.colocated else self.num_attn_ranks + self.num_expert_ranks

    def attn_rank(self, group: int, tp_rank: int = 0) -> int:
        """Global rank of ``tp_rank`` in attention group ``group``."""
        _check_index("attention group", group, self.n_a)
        _check_index("attention tp rank", tp_rank, self.tp_a)
        return group * self.tp_a + tp_rank

    def expert_rank(self, group: int, tp_rank: int = 0) -> int:
        """Global rank of ``tp_rank`` in expert group ``group``."""
        _check_index("expert group", group, self.n_e)
        _check_index("expert tp rank", tp_rank, self.tp_e)
        return (0 if self.colocated else self.num_attn_ranks) + group * self.tp_e + tp_rank

    def role_of(self, rank: int) -> RankRole:
        """The side, group and TP rank of global ``rank``."""
        _check_index("rank", rank, self.world_size)
        if self.colocated:
            return RankRole("colocated", rank, 0)
        if rank < self.num_attn_ranks:
            return RankRole("attn", rank // self.tp_a, rank % self.tp_a)
        local = rank - self.num_attn_ranks
        return RankRole("expert", local // self.tp_e, local % self.tp_e)

    def attn_group_ranks(self, group: int) -> list[int]:
        """Global ranks of attention group ``group``, tp rank 0 first."""
        return [self.attn_rank(group, t) for t in range(self.tp_a)]

    def expert_group_ranks(self, group: int) -> list[int]:
        """Global ranks of expert group ``group``, tp rank 0 first."""
        return [self.expert_rank(group, t) for t in range(self.tp_e)]

    @property
    def attn_leaders(self) -> list[int]:
        """Global rank of the TP leader of every attention group, in group order."""
        return [self.attn_rank(g) for g in range(self.n_a)]

    @property
    def expert_leaders(self) -> list[int]:
        """Global rank of the TP leader of every expert group, in group order."""
        return [self.expert_rank(g) for g in range(self.n_e)]

    @property
    def leaders(self) -> list[int]:
        """Every rank that leads a group on either side, ascending (each once)."""
        return sorted(set(self.attn_leaders + self.expert_leaders))

    def describe(self, rank: int) -> str:
        """A rank for error messages, e.g. ``"rank 3 (expert group 1, tp rank 0)"``."""
        if not 0 <= rank < self.world_size:
            return f"rank {rank} (outside the topology of {self.world_size} ranks)"
        r = self.role_of(rank)
        if r.role == "colocated":
            return f"rank {rank} (colocated attention and expert group {r.group})"
        side = "attention" if r.role == "attn" else "expert"
        return f"rank {rank} ({side} group {r.group}, tp rank {r.tp_rank})"


def _check_index(what: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise ValueError(f"{what} {value} is out of range [0, {size})")
