"""init_distributed refuses a world that does not match the topology, before any rendezvous
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
