"""Expert placement: contiguous split without divisibility, slots, validation."""

from __future__ import annotations

import pytest
import torch

from afdserve.expert.placement import ExpertPlacement, contiguous_placement


def test_eight_experts_on_three_groups():
    p = contiguous_placement(8, 3)
    assert [p.experts_of_group(g) for g in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [p.num_local(g) for g in range(3)] == [3, 3, 2]
    assert p.group_of_expert == (0, 0, 0, 1, 1, 1, 2, 2)
    assert p.slot_of_expert == (0, 1, 2, 0, 1, 2, 0, 1)


@pytest.mark.parametrize("num_experts", [1, 5, 8, 60, 64])
def test_every_group_count_is_balanced(num_experts):
    for groups in range(1, num_experts + 1):
        p = contiguous_placement(num_experts, groups)
        sizes = [p.num_local(g) for g in range(groups)]
        assert sum(sizes) == num_experts and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        flat = [e for g in range(groups) for e in p.experts_of_group(g)]
        assert flat == list(range(num_experts))
        for e in range(num_experts):
            assert p.experts_of_group(p.group_of_expert[e])[p.slot_of_expert[e]] == e


def test_lookup_table_and_for_layer():
    p = contiguous_placement(5, 2)
    assert p.lookup_E2("cpu").tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]]
    assert p.lookup_E2("cpu").dtype == torch.int64
    assert p.for_layer(7) is p
    assert p == contiguous_placement(5, 2)


@pytest.mark.parametrize("args", [(8, 0), (8, 9), (0, 1)])
def test_impossible_splits_are_rejected(args):
    with pytest.raises(ValueError):
        contiguous_placement(*args)


def test_slots_must_be_dense():
    with pytest.raises(ValueError, match="without gaps"):
        ExpertPlacement(2, (0, 0, 1), (0, 2, 0))
    with pytest.raises(ValueError, match="out of range"):
        ExpertPlacement(2, (0, 2), (0, 0))
