"""TorchP2PTransport over Gloo equals the pure-torch reference; its checks fire before sending."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from afdserve.expert.placement import ExpertPlacement, contiguous_placement
from afdserve.launcher import WorkerDied, launch
from afdserve.transport.base import CapacityError, Rows
from afdserve.transport.reference import reference_m2n, route
from afdserve.transport.topology import Topology
from afdserve.transport.torch_p2p import TorchP2PTransport, pack_rows, unpack_rows

D, CAP, LAYERS = 8, 12, 3
SEEDS, M_VALUES = (0, 1), (1, 3)
# (n_a, tp_a, n_e, tp_e), num_experts, top_k
# (n_e = E and other splits are placement's business, tested without processes)
TOPOLOGIES = [((3, 1, 2, 1), 8, 2), ((1, 2, 2, 2), 5, 2)]


def _sends(seed: int, a: int, layer: int, mb: int, placement: ExpertPlacement, top_k: int,
           device: torch.device | str = "cpu") -> list[Rows]:
    """Attention group a's messages at (layer, mb): some empty, and at layer 1 one expert
    group that nobody sends a row to."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + a * 10_007 + layer * 101 + mb)
    tokens = 0 if (a + layer + mb) % 4 == 0 else int(torch.randint(1, CAP + 1, (1,), generator=gen))
    starved = (seed + mb) % placement.num_groups if layer == 1 and placement.num_groups > 1 else -1
    allowed = torch.tensor([e for e in range(placement.num_experts) if placement.group_of_expert[e] != starved])
    ids_TK = allowed[torch.argsort(torch.rand(tokens, len(allowed), generator=gen), dim=1)[:, :top_k]]
    x_TD, w_TK = torch.randn(tokens, D, generator=gen), torch.rand(tokens, top_k, generator=gen)
    return route(x_TD.to(device), ids_TK.to(device), w_TK.to(device), placement)[0]


def _fake_experts(rows: Rows, layer: int, group: int) -> torch.Tensor:
    """Stands in for the expert FFN: depends on x, ids and w of every row."""
    mix_N1 = (rows.w_NK * (rows.ids_NK + 1) * (rows.ids_NK >= 0)).sum(1, keepdim=True)
    return rows.x_ND * (1 + layer + 10 * group) + mix_N1


def _same(p: Rows, q: Rows) -> bool:
    return torch.equal(p.x_ND, q.x_ND) and torch.equal(p.ids_NK, q.ids_NK) and torch.equal(p.w_NK, q.w_NK)


def _attn_leader(t: TorchP2PTransport, group: int, placement, top_k: int) -> int:
    checks = 0
    for seed in SEEDS:
        for m in M_VALUES:
            for layer in range(LAYERS):
                sends = [_sends(seed, group, layer, mb, placement, top_k, t.device) for mb in range(m)]
                handles = [t.dispatch(layer, mb, sends[mb]) for mb in range(m)]  # all m in flight
                for mb in (reversed(range(m)) if layer % 2 else range(m)):  # also out of order
                    partials = t.combine_wait(handles[mb])
                    for g, (rows, y_ND) in enumerate(zip(sends[mb], partials)):
                        assert torch.equal(y_ND, _fake_experts(rows, layer, g)), (seed, m, layer, mb, g)
                        checks += 1
    return checks


def _expert_leader(t: TorchP2PTransport, topo: Topology, group: int, placement, top_k: int, early_ok: bool) -> int:
    """``early_ok`` (Gloo): post all receives of a layer first, at layer 2 even backwards, which
    only the tags keep apart; NCCL needs the schedule's order: receive, wait, reply, next."""
    checks = 0
    for seed in SEEDS:
        for m in M_VALUES:
            for layer in range(LAYERS):
                early = None
                if early_ok and layer != 1:
                    order = range(m) if layer == 0 else reversed(range(m))
                    early = {mb: t.receive(layer, mb) for mb in order}
                replies = []
                for mb in range(m):
                    rows = t.receive_wait(early[mb] if early else t.receive(layer, mb))
                    all_sends = [_sends(seed, a, layer, mb, placement, top_k, t.device) for a in range(topo.n_a)]
                    expected = reference_m2n(all_sends)[group]
                    assert len(rows) == topo.n_a
                    for a, (got, want) in enumerate(zip(rows, expected)):
                        assert _same(got, want), (seed, m, layer, mb, a)
                        checks += 1
                    replies.append(t.reply(layer, mb, [_fake_experts(r, layer, group) for r in rows]))
                for handle in replies:
                    t.reply_wait(handle)
    return checks


def _exchange_worker(rank: int, world_size: int, init_method: str, sizes, num_experts: int, top_k: int,
                     out_dir: str, backend: str = "gloo") -> None:
    import torch.distributed as dist

    from afdserve.transport.groups import init_distributed

    torch.set_num_threads(1)
    topo = Topology(*sizes)
    groups = init_distributed(topo, rank, backend, init_method, timeout_s=60)
    role, placement = topo.role_of(rank), contiguous_placement(num_experts, topo.n_e)
    checks = 0
    if role.is_leader and role.role == "attn":
        t = TorchP2PTransport.attn_side(topo, rank, D, top_k, torch.float32, groups.device, CAP, groups)
        checks += _attn_leader(t, role.group, placement, top_k)
    elif role.is_leader:
        t = TorchP2PTransport.expert_side(topo, rank, D, top_k, torch.float32, groups.device, CAP, groups)
        checks += _expert_leader(t, topo, role.group, placement, top_k, early_ok=backend == "gloo")
    # the TP group holds exactly this group's ranks
    members = (topo.attn_group_ranks if role.role == "attn" else topo.expert_group_ranks)(role.group)
    total = torch.tensor([rank], device=groups.device)
    dist.all_reduce(total, group=groups.tp_group)
    assert int(total) == sum(members) and groups.tp_leader == members[0]
    groups.destroy()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"checks": checks + 1}, f)


def _check_exchange(tmp_path, sizes, num_experts: int, top_k: int, backend: str) -> None:
    topo = Topology(*sizes)
    assert launch(_exchange_worker, topo.world_size, (sizes, num_experts, top_k, str(tmp_path), backend),
                  describe=topo.describe) == 0
    per_step = len(SEEDS) * sum(M_VALUES) * LAYERS  # (seed, m, layer, mb) exchanges
    for rank in range(topo.world_size):
        role = topo.role_of(rank)
        checks = json.loads((tmp_path / f"rank{rank}.json").read_text())["checks"]
        peers = topo.n_e if role.role == "attn" else topo.n_a
        assert checks == 1 + (per_step * peers if role.is_leader else 0), topo.describe(rank)


@pytest.mark.slow
@pytest.mark.parametrize("sizes,num_experts,top_k", TOPOLOGIES,
                         ids=["na{}_tpa{}_ne{}_tpe{}".format(*s) + f"_E{e}_K{k}" for s, e, k in TOPOLOGIES])
def test_p2p_equals_reference(tmp_path, sizes, num_experts, top_k):
    _check_exchange(tmp_path, sizes, num_experts, top_k, "gloo")


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (2, 1, 2, 1)], ids=["na1_ne1", "na2_ne2"])
def test_p2p_equals_reference_nccl(tmp_path, sizes):
    if torch.cuda.device_count() < Topology(*sizes).world_size:
        pytest.skip(f"needs {Topology(*sizes).world_size} CUDA GPUs")
    _check_exchange(tmp_path, sizes, 8, 2, "nccl")


def _capacity_worker(rank: int, world_size: int, init_method: str) -> None:
    from afdserve.transport.groups import init_distributed

    topo = Topology(1, 1, 1, 1)
    init_distributed(topo, rank, "gloo", init_method, timeout_s=60)
    placement = contiguous_placement(4, 1)
    if rank == 0:  # the attention side allows 12 rows, the expert side only 4
        t = TorchP2PTransport.attn_side(topo, rank, D, 2, torch.float32, "cpu", 12)
        x_TD, ids_TK = torch.randn(10, D), torch.tensor([[0, 1]] * 10)
        t.combine_wait(t.dispatch(0, 0, route(x_TD, ids_TK, torch.ones(10, 2), placement)[0]))
    else:
        t = TorchP2PTransport.expert_side(topo, rank, D, 2, torch.float32, "cpu", 4)
        t.receive_wait(t.receive(0, 0))


@pytest.mark.slow
def test_receiver_capacity_error_names_ranks_and_stops_all():
    start = time.monotonic()
    with pytest.raises(WorkerDied) as err:
        launch(_capacity_worker, 2, describe=Topology(1, 1, 1, 1).describe, grace_s=1.0)
    msg = str(err.value)
    assert err.value.rank == 1 and "CapacityError" in msg and "10 rows" in msg
    assert "rank 1 (expert group 0, tp rank 0)" in msg and "rank 0 (attention group 0, tp rank 0)" in msg
    assert time.monotonic() - start < 60


def _transport(rank: int = 0, capacity: int = 4, topo: Topology | None = None) -> TorchP2PTransport:
    topo = topo or Topology(1, 2, 2, 1)
    return TorchP2PTransport(topo, rank, D, 2, torch.float32, "cpu", capacity)


def test_sender_checks_capacity_before_sending():
    t = _transport(capacity=4)  # no process group exists: a send would raise something else
    ok, big = Rows.empty(D, 2, torch.float32), Rows(torch.zeros(5, D), torch.zeros(5, 2, dtype=torch.int32),
                                                    torch.zeros(5, 2))
    with pytest.raises(CapacityError, match=r"rank 0 \(attention group 0, tp rank 0\) to rank 3 \(expert group 1"):
        t.dispatch(0, 0, [ok, big])
    with pytest.raises(ValueError, match="one Rows per expert group"):
        t.dispatch(0, 0, [ok])
    with pytest.raises(ValueError, match="ids_NK"):
        t.dispatch(0, 0, [ok, Rows(torch.zeros(1, D), torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2))])


def test_roles_are_enforced():
    topo = Topology(1, 2, 2, 1)
    with pytest.raises(ValueError, match="rank 1 .* not its group's leader"):
        _transport(rank=1, topo=topo)
    with pytest.raises(ValueError, match="cannot hold the attn side"):
        TorchP2PTransport.attn_side(topo, 2, D, 2, torch.float32, "cpu", 4)
    expert = TorchP2PTransport.expert_side(topo, 3, D, 2, torch.float32, "cpu", 4)
    with pytest.raises(RuntimeError, match="attn-side call"):
        expert.dispatch(0, 0, [])
    with pytest.raises(RuntimeError, match="without a completed receive"):
        expert.reply(0, 0, [torch.zeros(0, D)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,k,d", [(0, 2, 8), (3, 1, 5), (7, 3, 7)])
def test_pack_unpack_round_trip(dtype, n, k, d):
    gen = torch.Generator().manual_seed(n * 10 + k)
    rows = Rows(torch.randn(n, d, generator=gen).to(dtype), torch.randint(-1, 9, (n, k), generator=gen,
                                                                          dtype=torch.int32),
                torch.rand(n, k, generator=gen))
    buf = pack_rows(rows)
    assert buf.dtype == torch.uint8 and buf.numel() == n * (8 * k + d * dtype.itemsize)
    back = unpack_rows(buf.clone(), n, d, k, dtype)
    assert _same(back, rows)
