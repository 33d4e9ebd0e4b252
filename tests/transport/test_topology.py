"""Topology: rank layout, roles, leaders, descriptions, validation."""

from __future__ import annotations

import pytest

from afdserve.transport.topology import RankRole, Topology


def test_layout_attention_first_then_experts():
    t = Topology(n_a=2, tp_a=2, n_e=3, tp_e=1)
    assert t.world_size == 7
    roles = [t.role_of(r) for r in range(t.world_size)]
    assert roles == [RankRole("attn", 0, 0), RankRole("attn", 0, 1), RankRole("attn", 1, 0), RankRole("attn", 1, 1),
                     RankRole("expert", 0, 0), RankRole("expert", 1, 0), RankRole("expert", 2, 0)]
    assert t.attn_leaders == [0, 2]
    assert t.expert_leaders == [4, 5, 6]
    assert t.attn_group_ranks(1) == [2, 3]
    assert t.expert_group_ranks(2) == [6]


@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (3, 1, 2, 1), (2, 3, 5, 2), (1, 4, 1, 8)])
def test_role_of_inverts_rank_functions(sizes):
    t = Topology(*sizes)
    seen = set()
    for g in range(t.n_a):
        for tp in range(t.tp_a):
            r = t.attn_rank(g, tp)
            assert t.role_of(r) == RankRole("attn", g, tp)
            seen.add(r)
    for g in range(t.n_e):
        for tp in range(t.tp_e):
            r = t.expert_rank(g, tp)
            assert t.role_of(r) == RankRole("expert", g, tp)
            seen.add(r)
    assert seen == set(range(t.world_size))
    assert all(t.role_of(r).is_leader for r in t.attn_leaders + t.expert_leaders)


def test_describe():
    t = Topology(2, 1, 2, 2)
    assert t.describe(3) == "rank 3 (expert group 0, tp rank 1)"
    assert t.describe(1) == "rank 1 (attention group 1, tp rank 0)"
    assert "outside" in t.describe(9)


@pytest.mark.parametrize("bad", [(0, 1, 1, 1), (1, -1, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0), (1.5, 1, 1, 1),
                                 (True, 1, 1, 1)])
def test_invalid_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="Topology"):
        Topology(*bad)


def test_out_of_range_indices():
    t = Topology(2, 1, 2, 1)
    with pytest.raises(ValueError, match="rank 4"):
        t.role_of(4)
    with pytest.raises(ValueError, match="attention group 2"):
        t.attn_rank(2)
    with pytest.raises(ValueError, match="expert tp rank 1"):
        t.expert_rank(0, 1)


def test_colocated_topology():
    topo = Topology(3, 1, 3, 1, colocated=True)
    assert topo.world_size == 3
    assert [topo.role_of(r).role for r in range(3)] == ["colocated"] * 3
    assert topo.attn_leaders == topo.expert_leaders == topo.leaders == [0, 1, 2]
    assert topo.expert_rank(2) == topo.attn_rank(2) == 2
    assert "colocated attention and expert group 1" in topo.describe(1)
    for bad in ((2, 1, 3, 1), (2, 2, 2, 1), (2, 1, 2, 2)):
        with pytest.raises(ValueError, match="colocated"):
            Topology(*bad, colocated=True)
