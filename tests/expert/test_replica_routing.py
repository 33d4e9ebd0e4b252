"""Tokens routed to a replicated expert spread over its replicas by their shares."""

from __future__ import annotations

import torch

from afdserve.expert.placement import LayeredPlacement, ReplicaPlacement
from afdserve.transport.reference import route, unroute


def _placement() -> ReplicaPlacement:
    # 3 groups x 2 slots; expert 0 on groups 0 and 2 (70/30), expert 3 on groups 1 and 2
    return ReplicaPlacement(3, 2, (0, 1, 2, 3, 0, 3), (0.7, 1.0, 1.0, 0.5, 0.3, 0.5))


def test_assign_follows_shares():
    p = _placement()
    ids = torch.zeros(20000, 1, dtype=torch.int64)
    group, slot = p.assign(ids)
    frac_g0 = float((group == 0).double().mean())
    assert abs(frac_g0 - 0.7) < 0.01 and set(group.flatten().tolist()) == {0, 2}
    assert (slot[group == 0] == 0).all() and (slot[group == 2] == 0).all()
    group, slot = p.assign(torch.full((1000, 1), 1))
    assert (group == 0).all() and (slot == 1).all()


def test_route_with_replicas_gives_the_same_sum():
    p = _placement()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=gen)
    ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(50)])
    w = torch.rand(50, 2, generator=gen)
    sends, handle = route(x, ids, w, p)
    # an "expert" that multiplies by (global expert id + 1): the result must not depend on the replica
    experts_of = [p.experts_of_group(g) for g in range(3)]
    partials = []
    for g, rows in enumerate(sends):
        out = torch.zeros_like(rows.x_ND)
        for k in range(2):
            held = rows.ids_NK[:, k] >= 0
            eid = torch.tensor([experts_of[g][i] for i in rows.ids_NK[held, k].tolist()], dtype=torch.float32)
            out[held] += rows.x_ND[held] * (eid + 1)[:, None] * rows.w_NK[held, k, None]
        partials.append(out)
    y = unroute(partials, handle, 50)
    ref = x * ((ids.float() + 1) * w).sum(-1, keepdim=True)
    assert torch.allclose(y, ref, atol=1e-5)


def test_layered_placement_from_tensors():
    phy2log = torch.tensor([[0, 1, 2, -1], [2, 0, 1, 0]])
    share = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.5, 1.0, 0.5]])
    lp = LayeredPlacement.from_tensors(phy2log, share, num_groups=2, version=3)
    assert lp.version == 3 and lp.num_groups == 2
    assert lp.for_layer(0).experts_of_group(1) == [2]
    assert lp.for_layer(1).experts_of_group(1) == [1, 0]


def test_padding_rows_have_no_replica():
    """Rows of id -1 (CUDA-graph padding) get group and slot -1; the real rows before them keep
    the replicas they get alone (the draw depends on the pair's index only)."""
    p = _placement()
    ids = torch.tensor([[0, 3], [1, 0], [-1, -1]])
    group, slot = p.assign(ids)
    alone = p.assign(ids[:2])
    assert torch.equal(group[:2], alone[0]) and torch.equal(slot[:2], alone[1])
    assert group[2].tolist() == [-1, -1] and slot[2].tolist() == [-1, -1]
