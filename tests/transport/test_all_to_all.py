"""The colocated layout's exchange (AllToAllExchange) over Gloo equals the pure-torch
reference: every rank receives what ``reference_m2n`` says, and each sender gets back, row by
row, the output computed for its own rows."""

from __future__ import annotations

import json
import os

import pytest
import torch

from afdserve.expert.placement import contiguous_placement
from afdserve.launcher import launch
from afdserve.transport.all_to_all import AllToAllExchange
from afdserve.transport.base import CapacityError, Rows
from afdserve.transport.reference import reference_m2n
from afdserve.transport.topology import Topology
from tests.transport.test_torch_p2p import CAP, D, _fake_experts, _same, _sends

LAYERS, MICRO_BATCHES = 3, 2


def _worker(rank: int, world_size: int, init_method: str, num_experts: int, top_k: int, out_dir: str) -> None:
    from afdserve.transport.groups import init_distributed

    torch.set_num_threads(1)
    topo = Topology(world_size, 1, world_size, 1, colocated=True)
    groups = init_distributed(topo, rank, "gloo", init_method, timeout_s=60)
    placement = contiguous_placement(num_experts, world_size)
    ex = AllToAllExchange(rank, world_size, D, top_k, torch.float32, "cpu", CAP, group=groups.a2e)
    checks = 0
    for seed in (0, 1):
        for layer in range(LAYERS):
            for mb in range(MICRO_BATCHES):
                sends = _sends(seed, rank, layer, mb, placement, top_k)
                rows, sent, received = ex.dispatch(layer, mb, sends)
                expected = reference_m2n([_sends(seed, a, layer, mb, placement, top_k)
                                          for a in range(world_size)])[rank]
                assert len(rows) == world_size and received == [r.num_rows for r in expected]
                for got, want in zip(rows, expected):
                    assert _same(got, want)
                    checks += 1
                back = ex.combine([_fake_experts(r, layer, rank) for r in rows], sent, received)
                for g, (mine, y_ND) in enumerate(zip(sends, back)):
                    assert torch.equal(y_ND, _fake_experts(mine, layer, g))
                    checks += 1
    with pytest.raises(CapacityError, match=f"rank {rank} to rank 0"):
        too_many = Rows(torch.zeros(CAP + 1, D), torch.zeros(CAP + 1, top_k, dtype=torch.int32),
                        torch.zeros(CAP + 1, top_k))
        ex.dispatch(0, 0, [too_many] + [Rows.empty(D, top_k, torch.float32)] * (world_size - 1))
    groups.destroy()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"checks": checks}, f)


@pytest.mark.slow
@pytest.mark.parametrize("ranks,num_experts,top_k", [(2, 4, 2), (3, 8, 3)])
def test_all_to_all_equals_reference(tmp_path, ranks, num_experts, top_k):
    assert launch(_worker, ranks, (num_experts, top_k, str(tmp_path))) == 0
    expected = 2 * 2 * LAYERS * MICRO_BATCHES * ranks  # (seed, layer, mb) x both directions x peers
    for rank in range(ranks):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["checks"] == expected
