"""The replica placement against its lower bound and the naive contiguous placement."""

from __future__ import annotations

import statistics

import pytest
import torch

from afdserve.expert.balance import (
    balanced_placement,
    balancedness,
    contiguous,
    group_loads,
    lower_bound,
    replicate,
    zipf_loads,
)

CASES = [(e, g, r, s) for e in (8, 32, 128) for g in (2, 4, 8, 16) if g <= e
         for r in (0, 2, 8, 16) for s in (0.6, 1.0, 1.4)]


def _check_valid(phy2log, share, e: int, g: int, slots: int, num_slots: int) -> None:
    for p_row, s_row in zip(phy2log, share):
        used = p_row[p_row >= 0]
        assert len(used) <= num_slots
        assert set(used.tolist()) == set(range(e)), "every expert placed"
        for grp in p_row.view(g, slots):
            held = grp[grp >= 0].tolist()
            assert len(held) == len(set(held)), "no two copies of an expert in one group"
            assert grp[: len(held)].tolist() == held, "used slots first"
        totals = torch.zeros(e, dtype=torch.float64).index_add_(0, p_row.clamp(min=0), s_row * (p_row >= 0))
        assert torch.allclose(totals, torch.ones(e, dtype=torch.float64), atol=1e-6)
        assert (s_row >= -1e-12).all()


def test_placement_is_near_the_lower_bound_and_far_below_naive():
    ratios, gains = [], []
    for e, g, r, s in CASES:
        slots = -(-(e + r) // g)
        loads = zipf_loads(2, e, s, seed=e + g + r)
        phy2log, share = balanced_placement(loads, g, slots, e + r)
        _check_valid(phy2log, share, e, g, slots, e + r)
        ours = group_loads(phy2log, share, loads, slots).max(-1).values
        lb = lower_bound(loads, g, slots, e + r)
        naive = group_loads(*contiguous(2, e, g, slots), loads, slots).max(-1).values
        assert (ours >= lb * (1 - 1e-6)).all(), "the bound must hold"
        assert (ours <= naive + 1e-9).all()
        ratios.append(float((ours / lb).max()))
        gains.append(float((naive / ours).max()))
    within = sum(x <= 1.05 for x in ratios) / len(ratios)
    assert statistics.median(ratios) <= 1.01 and within >= 0.9, (statistics.median(ratios), within)
    assert statistics.median(gains) >= 1.3


def test_replicate_water_fills_the_heaviest_experts():
    loads = torch.tensor([100.0, 10.0, 10.0, 5.0])
    reps = replicate(loads, num_slots=7, max_replicas=4)
    assert reps.tolist() == [4, 1, 1, 1]
    reps = replicate(loads, num_slots=8, max_replicas=3)
    assert reps.tolist() == [3, 2, 2, 1] or reps.tolist() == [3, 2, 1, 2]


def test_uniform_loads_are_perfectly_balanced_when_divisible():
    loads = torch.ones(1, 8, dtype=torch.float64)
    phy2log, share = balanced_placement(loads, 4, 2)
    assert balancedness(group_loads(phy2log, share, loads, 2)[0]) == pytest.approx(1.0)


def test_redundancy_splits_a_hot_expert_across_groups():
    loads = torch.tensor([[70.0, 10.0, 10.0, 10.0]])
    phy2log, share = balanced_placement(loads, 2, 3, num_slots=5)  # one spare slot
    gl = group_loads(phy2log, share, loads, 3)[0]
    assert (phy2log[0] == 0).sum() == 2
    assert gl.max() == pytest.approx(50.0)
