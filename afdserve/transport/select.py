"""Which M2N transport a deployment uses (``--afd-transport``): the shared-slot one between
leaders of one node with CUDA ("ipc"), torch.distributed send/recv otherwise ("p2p"). Every
leader calls ``make_transport`` at the same point of its start-up (both choices may run
collectives over the leaders' group) and they all choose alike."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from afdserve.transport.groups import Groups
from afdserve.transport.slots import SlotTransport
from afdserve.transport.torch_p2p import TorchP2PTransport


def choose_transport(kind: str, groups: Groups) -> str:
    """"ipc" or "p2p" for ``kind`` ("auto", "ipc", "p2p"). "auto" takes "ipc" when every leader
    runs on CUDA on one host and each of their GPUs can access the others' memory (P2P). GPUs
    are named by UUID, so processes that see different CUDA_VISIBLE_DEVICES still agree."""
    if kind != "auto":
        return kind
    cuda = groups.device.type == "cuda"
    mine = (groups.device.index if groups.device.index is not None else torch.cuda.current_device()) if cuda else -1
    reach = {_uuid(d) for d in range(torch.cuda.device_count() if cuda else 0)
             if d == mine or torch.cuda.can_device_access_peer(mine, d)}
    where = [None] * len(groups.topology.leaders)
    dist.all_gather_object(where, (socket.gethostname(), _uuid(mine) if cuda else None, reach), group=groups.a2e)
    one_host = len({host for host, _, _ in where}) == 1
    return "ipc" if cuda and one_host and all(g in r for _, _, r in where for _, g, _ in where) else "p2p"


def _uuid(device: int) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def make_transport(kind: str, groups: Groups, rank: int, hidden_size: int, top_k: int, dtype: torch.dtype,
                   capacity: int, micro_batches: int, timeout_s: float):
    """This leader's end of the transport (attention or expert side from its role)."""
    topo, device = groups.topology, groups.device
    side = topo.role_of(rank).role
    if choose_transport(kind, groups) == "ipc":
        cls = SlotTransport.attn_side if side == "attn" else SlotTransport.expert_side
        return cls(topo, rank, hidden_size, top_k, dtype, device, capacity, micro_batches, group=groups.a2e,
                   timeout_s=timeout_s)
    cls = TorchP2PTransport.attn_side if side == "attn" else TorchP2PTransport.expert_side
    return cls(topo, rank, hidden_size, top_k, dtype, device, capacity, groups=groups)
