"""init_distributed refuses a world that does not match the topology, before any rendezvous;
the start-up wait outlasts the groups' timeout
(the process groups themselves are exercised by the multi-process transport tests)."""

from __future__ import annotations

import pytest

from afdserve.transport.groups import init_distributed
from afdserve.transport.topology import Topology


def test_world_size_mismatch_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=4 but the topology .* needs 5 ranks \(3x1 attention"):
        init_distributed(Topology(3, 1, 2, 1), 0, "gloo", "env://")


def test_rank_outside_topology():
    with pytest.raises(ValueError, match="rank 5 is outside the topology's 5 ranks"):
        init_distributed(Topology(3, 1, 2, 1), 5, "gloo", "tcp://127.0.0.1:1")


def _slow_loader(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    import time

    import torch
    import torch.distributed as dist

    groups = init_distributed(Topology(1, 1, 1, 1), rank, "gloo", init_method, timeout_s=2.0)
    if rank == 1:
        time.sleep(5.0)  # loading weights for longer than the groups' 2 s timeout
    groups.wait_for_all()
    x = torch.ones(1)
    dist.all_reduce(x, group=groups.a2e)  # the first collective with the other side
    with open(f"{out_dir}/rank{rank}", "w") as f:
        f.write(str(int(x)))
    groups.destroy()


def test_start_up_wait_outlasts_the_group_timeout(tmp_path):
    """One side loading longer than --dist-timeout does not time out the other's start-up."""
    from afdserve.launcher import launch

    assert launch(_slow_loader, 2, (str(tmp_path),)) == 0
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["2", "2"]
