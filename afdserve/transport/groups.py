"""Process groups of a disaggregated deployment: the world group, one TP group per attention
or expert group, and two groups of the group leaders for the M2N transport, one per direction
(A2E rows, E2A replies: on NCCL each group has its own stream, so replies of micro-batch i
never queue behind the rows of micro-batch i+1).

Every rank creates every subgroup, in the same order (attention groups 0..n_a-1, expert groups
0..n_e-1, then A2E and E2A, then the start-up group), as torch.distributed requires; each has
the same timeout as the world group, so a dead peer turns into an error on the survivors
instead of a hang, except the start-up group: ranks meet there once their weights are loaded,
which may take longer (``STARTUP_TIMEOUT_S``; a rank that dies meanwhile is caught by the
launcher or torchrun, which stop the others).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from afdserve.config import ConfigError
from afdserve.transport.topology import RankRole, Topology

STARTUP_TIMEOUT_S = 600.0  # ranks wait this long for each other to load their weights (also the frontend's)


@dataclass
class Groups:
    """The process groups of this rank. ``attn_tp[g]``/``expert_tp[g]`` hold the global ranks
    of attention/expert group g (also for tp = 1: never None, so no call falls back to the
    world group by accident)."""

    topology: Topology
    rank: int
    backend: str
    device: torch.device
    attn_tp: list[dist.ProcessGroup]
    expert_tp: list[dist.ProcessGroup]
    a2e: dist.ProcessGroup  # every group leader; only leaders may use it
    e2a: dist.ProcessGroup
    startup: dist.ProcessGroup  # every rank, Gloo, the long start-up timeout

    def wait_for_all(self) -> None:
        """Meet every rank once its weights are loaded (before the first collective with the
        other side): loading may take longer than the groups' timeout, this wait may not."""
        dist.barrier(group=self.startup)

    @property
    def role(self) -> RankRole:
        return self.topology.role_of(self.rank)

    @property
    def tp_group(self) -> dist.ProcessGroup:
        """The TP group this rank belongs to."""
        r = self.role
        return (self.attn_tp if r.role == "attn" else self.expert_tp)[r.group]

    @property
    def tp_leader(self) -> int:
        """Global rank of this rank's TP leader (the broadcast source inside the group)."""
        r = self.role
        return self.topology.attn_rank(r.group) if r.role == "attn" else self.topology.expert_rank(r.group)

    def destroy(self) -> None:
        """Tear down every process group of this process (safe to call twice)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(topology: Topology, rank: int, backend: str = "gloo", init_method: str = "env://",
                     timeout_s: float = 120.0, device: torch.device | str | None = None,
                     agree_on: dict | None = None) -> Groups:
    """Join the world of ``topology.world_size`` ranks as ``rank`` and create every TP group.

    ``init_method``: ``"env://"`` (torchrun: MASTER_ADDR/MASTER_PORT from the environment) or
    ``"tcp://host:port"``. ``timeout_s`` applies to every group. For NCCL, ``device`` defaults
    to ``cuda:$LOCAL_RANK`` (or rank modulo the visible GPUs), as does ``device="cuda"`` with
    Gloo (ranks sharing a GPU, which NCCL refuses); it becomes the current device.
    ``agree_on``: options every rank must share (``EngineConfig.agreement``); compared with
    rank 0's before any other group is made, a difference raises on every rank, naming it.
    Ends with an all-reduce over every rank: it checks the wiring and makes the first NCCL
    call a collective, as batched P2P on NCCL requires.
    """
    if not 0 <= rank < topology.world_size:
        raise ValueError(f"rank {rank} is outside the topology's {topology.world_size} ranks")
    env_world = os.environ.get("WORLD_SIZE")
    if init_method == "env://" and env_world is not None and int(env_world) != topology.world_size:
        raise ValueError(f"WORLD_SIZE={env_world} but the topology {topology} needs {topology.world_size} ranks "
                         f"({topology.n_a}x{topology.tp_a} attention + {topology.n_e}x{topology.tp_e} expert)")
    dev = _device(backend, rank, device)
    timeout = timedelta(seconds=timeout_s)
    # NCCL for CUDA tensors, Gloo for the CPU ones (the per-step flags, pickled objects)
    pg_backend = "cpu:gloo,cuda:nccl" if backend == "nccl" else backend
    dist.init_process_group(pg_backend, init_method=init_method, rank=rank, world_size=topology.world_size,
                            timeout=timeout)
    startup = dist.new_group(list(range(topology.world_size)), backend="gloo",
                             timeout=timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S)))
    if agree_on is not None:  # before the groups whose shape the options decide
        _check_agreement(agree_on, rank, topology, startup)
    attn = [dist.new_group(topology.attn_group_ranks(g), timeout=timeout) for g in range(topology.n_a)]
    expert = [dist.new_group(topology.expert_group_ranks(g), timeout=timeout) for g in range(topology.n_e)]
    a2e, e2a = (dist.new_group(topology.leaders, timeout=timeout) for _ in range(2))
    check_T = torch.ones(1, device=dev)
    dist.all_reduce(check_T)
    if int(check_T.item()) != topology.world_size:
        raise RuntimeError(f"{topology.describe(rank)}: world all-reduce gave {check_T.item()}, "
                           f"expected {topology.world_size}")
    return Groups(topology, rank, backend, dev, attn, expert, a2e, e2a, startup)


def _check_agreement(options: dict, rank: int, topology: Topology, group: dist.ProcessGroup) -> None:
    everyone: list[dict] = [{}] * topology.world_size
    dist.all_gather_object(everyone, options, group=group)
    first = everyone[0]  # every rank compares everyone with rank 0: all report the same ranks
    for other, theirs in enumerate(everyone):
        diff = sorted(k for k in first.keys() | theirs.keys() if first.get(k) != theirs.get(k))
        if diff:
            shown = "; ".join(f"{k}: {everyone[0].get(k)!r} vs {theirs.get(k)!r}" for k in diff[:6])
            raise ConfigError(f"rank {other} was started with other options than rank 0 (every rank of a "
                              f"deployment needs the same flags): {shown}")


def _device(backend: str, rank: int, device: torch.device | str | None) -> torch.device:
    if device is None and backend != "nccl":
        return torch.device("cpu")
    if device is None or str(device) == "cuda":
        local = os.environ.get("LOCAL_RANK")
        device = f"cuda:{int(local) if local is not None else rank % torch.cuda.device_count()}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev
