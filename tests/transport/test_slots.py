"""The shared-slot transport equals the pure-torch reference (route, the experts, unroute) on
random routings with empty and full micro-batches, many steps in a row (slot reuse), several
senders and receivers; a silent peer and a wrong header are reported with both ranks. CPU runs
it over shared memory; the GPU tests run the same exchanges over CUDA IPC (Triton kernels)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from afdserve.expert.placement import contiguous_placement
from afdserve.launcher import WorkerDied, launch
from afdserve.transport.base import CapacityError, Rows
from afdserve.transport.reference import route, unroute
from afdserve.transport.slots import SlotTransport, buffer_bytes
from afdserve.transport.topology import Topology

D, CAP, LAYERS, STEPS, TOP_K, EXPERTS = 16, 12, 3, 4, 2, 8


def _tokens(seed: int, a: int, step: int, mb: int) -> int:
    """Micro-batch sizes: empty, full and in between (fixed for the step, as in the engine)."""
    r = (seed * 7 + a * 5 + step * 3 + mb) % 5
    return (0, CAP, 1, CAP // 2, 5)[r]


def _inputs(seed: int, a: int, step: int, layer: int, mb: int, placement, dtype, device):
    """x, top-k ids and weights of one micro-batch; at layer 1 one expert group gets nothing;
    the last two rows of a micro-batch of more than 2 tokens are padding (CUDA graphs: id -1,
    weight 0: no expert)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + a * 10_007 + step * 1_009 + layer * 101 + mb)
    tokens = _tokens(seed, a, step, mb)
    starved = (step + mb) % placement.num_groups if layer == 1 and placement.num_groups > 1 else -1
    allowed = torch.tensor([e for e in range(EXPERTS) if placement.group_of_expert[e] != starved])
    ids_TK = allowed[torch.argsort(torch.rand(tokens, len(allowed), generator=gen), dim=1)[:, :TOP_K]]
    x_TD, w_TK = torch.randn(tokens, D, generator=gen).to(dtype), torch.rand(tokens, TOP_K, generator=gen)
    if tokens > 2:
        ids_TK[-2:], w_TK[-2:] = -1, 0.0
    return x_TD.to(device), ids_TK.to(device), w_TK.to(device)


def _fake_experts(rows: Rows, layer: int, group: int) -> torch.Tensor:
    """Stands in for the expert FFN: depends on x, ids and w of every row."""
    mix_N1 = (rows.w_NK * (rows.ids_NK + 1) * (rows.ids_NK >= 0)).sum(1, keepdim=True)
    return (rows.x_ND.float() * (1 + layer + 10 * group) + mix_N1).to(rows.x_ND.dtype)


def _attn_leader(t: SlotTransport, a: int, placement, seeds, m: int) -> int:
    checks = 0
    for seed in seeds:
        for step in range(STEPS):
            t.begin_step([_tokens(seed, a, step, mb) for mb in range(m)])
            for layer in range(LAYERS):
                inputs = [_inputs(seed, a, step, layer, mb, placement, t.dtype, t.device) for mb in range(m)]
                handles = [t.dispatch_tokens(layer, mb, *inputs[mb], placement) for mb in range(m)]
                for mb in range(m):
                    y_TD = t.combine_tokens(handles[mb]).clone()
                    sends, routing = route(*inputs[mb], placement)
                    want = unroute([_fake_experts(r, layer, g) for g, r in enumerate(sends)], routing,
                                   inputs[mb][0].shape[0])
                    assert torch.equal(y_TD, want), (seed, step, layer, mb)
                    checks += 1
    t.check()
    return checks


def _expert_leader(t: SlotTransport, topo: Topology, g: int, placement, seeds, m: int) -> int:
    checks = 0
    for seed in seeds:
        for step in range(STEPS):
            t.begin_step()
            if step % 2:  # as a CUDA graph captured for CAP rows per sender takes them
                t.expect_at_most(CAP)
            for layer in range(LAYERS):
                for mb in range(m):
                    rows = t.receive_wait(t.receive(layer, mb))
                    for a, got in enumerate(rows):
                        want = route(*_inputs(seed, a, step, layer, mb, placement, t.dtype, t.device), placement)[0][g]
                        n, bound = want.num_rows, CAP if step % 2 else _tokens(seed, a, step, mb)
                        assert got.num_rows == bound, (seed, step, layer, mb, a)
                        assert torch.equal(got.x_ND[:n], want.x_ND) and torch.equal(got.ids_NK[:n], want.ids_NK)
                        assert torch.equal(got.w_NK[:n], want.w_NK)
                        assert bool((got.ids_NK[n:] == -1).all()) and bool((got.w_NK[n:] == 0).all())
                        checks += 1
                    t.reply_wait(t.reply(layer, mb, [_fake_experts(r, layer, g) for r in rows]))
    t.check()
    return checks


def _exchange_worker(rank: int, world_size: int, init_method: str, sizes, m: int, device: str, seeds,
                     out_dir: str) -> None:
    from afdserve.transport.groups import init_distributed

    torch.set_num_threads(1)
    topo = Topology(*sizes)
    groups = init_distributed(topo, rank, "gloo", init_method, timeout_s=60)  # Gloo: 2 ranks may share a GPU
    if device == "cuda":
        device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    role, placement = topo.role_of(rank), contiguous_placement(EXPERTS, topo.n_e)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    checks = 0
    if role.is_leader:
        side = SlotTransport.attn_side if role.role == "attn" else SlotTransport.expert_side
        t = side(topo, rank, D, TOP_K, dtype, device, CAP, m, group=groups.a2e, timeout_s=30)
        if role.role == "attn":
            checks = _attn_leader(t, role.group, placement, seeds, m)
        else:
            checks = _expert_leader(t, topo, role.group, placement, seeds, m)
    groups.destroy()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"checks": checks}, f)


def check_exchange(tmp_path, sizes, m: int, device: str = "cpu", seeds=(0, 1)) -> None:
    topo = Topology(*sizes)
    assert launch(_exchange_worker, topo.world_size, (sizes, m, device, seeds, str(tmp_path)),
                  describe=topo.describe) == 0
    per_peer = len(seeds) * STEPS * LAYERS * m
    for rank in range(topo.world_size):
        role = topo.role_of(rank)
        checks = json.loads((tmp_path / f"rank{rank}.json").read_text())["checks"]
        want = per_peer * (1 if role.role == "attn" else topo.n_a) if role.is_leader else 0
        assert checks == want, topo.describe(rank)


@pytest.mark.slow
@pytest.mark.parametrize("sizes,m", [((1, 1, 1, 1), 1), ((2, 1, 3, 1), 2), ((3, 1, 2, 1), 3), ((1, 2, 2, 2), 4)],
                         ids=["na1_ne1_m1", "na2_ne3_m2", "na3_ne2_m3", "na1tp2_ne2tp2_m4"])
def test_slots_equal_reference(tmp_path, sizes, m):
    check_exchange(tmp_path, sizes, m)


@pytest.mark.gpu
@pytest.mark.parametrize("sizes,m", [((1, 1, 1, 1), 2), ((2, 1, 2, 1), 3), ((4, 1, 4, 1), 2)],
                         ids=["na1_ne1_m2", "na2_ne2_m3", "na4_ne4_m2"])
def test_slots_equal_reference_cuda(tmp_path, sizes, m):
    """Over CUDA IPC and the Triton kernels; with one GPU (or more ranks than GPUs) several
    processes share a GPU, which covers the protocol, not the speed."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    check_exchange(tmp_path, sizes, m, device="cuda", seeds=(0, 1, 2))


def _fault_worker(rank: int, world_size: int, init_method: str, fault: str, device: str) -> None:
    from afdserve.transport.groups import init_distributed

    topo = Topology(1, 1, 1, 1)
    groups = init_distributed(topo, rank, "gloo", init_method, timeout_s=60)
    dev = device if device == "cpu" else f"cuda:{rank % torch.cuda.device_count()}"
    placement = contiguous_placement(4, 1)
    side = SlotTransport.attn_side if rank == 0 else SlotTransport.expert_side
    t = side(topo, rank, D, TOP_K, torch.float32, dev, CAP, 1, group=groups.a2e, timeout_s=2)
    x, ids, w = torch.randn(4, D, device=dev), torch.tensor([[0, 1]] * 4, device=dev), torch.ones(4, 2, device=dev)
    if rank == 0:
        t.begin_step([4])
        if fault == "silent":
            time.sleep(30)  # never dispatches
        if fault == "cascade":  # every reply missing: later waits must not each wait the timeout
            for layer in range(12):
                t.combine_tokens(t.dispatch_tokens(layer, 0, x, ids, w, placement))
            t.check()
        h = t.dispatch_tokens(0 if fault not in ("header", "relay") else 1, 0, x, ids, w, placement)  # wrong layer
        if fault == "relay":  # the expert saw the bad header, still replies: its error must reach us
            t.combine_tokens(h)
            t.check()
        time.sleep(30)
    else:
        t.begin_step()
        if fault == "cascade":
            time.sleep(30)  # never replies
        rows = t.receive_wait(t.receive(0, 0))
        if fault == "relay":
            t.reply(0, 0, [torch.zeros_like(r.x_ND) for r in rows])
            time.sleep(30)
        t.check()  # CUDA: the error recorded on the GPU surfaces here
        time.sleep(30)


@pytest.mark.slow
@pytest.mark.parametrize("fault,what", [("silent", "no message arrived within the timeout"),
                                        ("header", "the header names layer 1")])
def test_faults_name_both_ranks(fault, what):
    _check_fault(fault, what, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("fault,what", [("silent", "no message arrived within the timeout"),
                                        ("header", "the header names layer 1")])
def test_faults_name_both_ranks_cuda(fault, what):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _check_fault(fault, what, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("fault,what,layer,within_s", [
    ("relay", "the peer reported an error of its own", 1, 30),  # its reply carries the expert's error
    ("cascade", "no message arrived within the timeout", 0, 15)])  # one timeout (2 s), not 12
def test_expert_errors_reach_the_attention_side_cuda(fault, what, layer, within_s):
    """The expert saw a wrong header but still replies: the attention side raises instead of
    using the rows. A peer that never replies costs one timeout, however many waits follow."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _check_fault(fault, what, "cuda", rank=0, layer=layer, within_s=within_s)


def _check_fault(fault: str, what: str, device: str, rank: int = 1, layer: int = 0, within_s: float = 30) -> None:
    start = time.monotonic()
    with pytest.raises(WorkerDied) as err:
        launch(_fault_worker, 2, (fault, device), describe=Topology(1, 1, 1, 1).describe, grace_s=1.0)
    msg = str(err.value)
    assert err.value.rank == rank and "SlotTransportError" in msg and what in msg, msg
    me, peer = "rank 1 (expert group 0, tp rank 0)", "rank 0 (attention group 0, tp rank 0)"
    if rank == 0:
        me, peer = peer, me
    assert f"{me}: {'rows' if rank else 'replies'} from {peer}" in msg, msg
    assert f"layer {layer}, micro-batch 0" in msg, msg
    assert time.monotonic() - start < within_s


def _capacity_worker(rank: int, world_size: int, init_method: str) -> None:
    from afdserve.transport.groups import init_distributed

    topo = Topology(1, 1, 1, 1)
    groups = init_distributed(topo, rank, "gloo", init_method, timeout_s=60)
    side = SlotTransport.attn_side if rank == 0 else SlotTransport.expert_side
    t = side(topo, rank, D, TOP_K, torch.float32, "cpu", CAP, 2, group=groups.a2e, timeout_s=5)
    if rank == 0:
        with pytest.raises(CapacityError, match=f"13 tokens is more than the transport capacity of {CAP} rows"):
            t.begin_step([3, CAP + 1])
        x = torch.zeros(CAP + 1, D)
        with pytest.raises(CapacityError, match="13 tokens"):
            t.dispatch_tokens(0, 0, x, torch.zeros(CAP + 1, 2, dtype=torch.long), torch.ones(CAP + 1, 2),
                              contiguous_placement(4, 1))
        with pytest.raises(RuntimeError, match="expert-side call"):
            t.receive(0, 0)
        t.begin_step([1, 0])  # the expert side is still waiting for its sizes: finish cleanly
    else:
        t.begin_step()
        with pytest.raises(RuntimeError, match="attn-side call"):
            t.combine_tokens(None)
        with pytest.raises(RuntimeError, match="without a completed receive"):
            t.reply(0, 0, [torch.zeros(1, D)])
    torch.distributed.barrier(group=groups.a2e)  # rank 0's sizes are delivered before it exits


@pytest.mark.slow
def test_capacity_and_roles_are_checked():
    assert launch(_capacity_worker, 2, describe=Topology(1, 1, 1, 1).describe) == 0


def test_buffer_size_counts_every_slot():
    rows = buffer_bytes(3, 2, 100, 64, 2, torch.bfloat16, rows=True)
    replies = buffer_bytes(3, 2, 100, 64, 2, torch.bfloat16, rows=False)
    assert rows - replies == 3 * 2 * 2 * 1024  # ids and weights: 800 B each, rounded to 256
    assert replies >= 3 * 2 * 100 * 64 * 2

