"""Glue between load statistics, the placement algorithm and the runtime: the initial
placement of a deployment, the sliding window of routed-token counts, and when to re-place.
Legend: L layers, E experts, G expert groups."""

from __future__ import annotations

import json
from collections import deque

import torch

from afdserve.config import ConfigError, EngineConfig
from afdserve.expert.balance import balanced_placement, balancedness, group_loads
from afdserve.expert.placement import ExpertPlacement, LayeredPlacement, contiguous_placement


def slots_per_group(cfg: EngineConfig) -> int:
    """Expert slots each group reserves: the experts plus redundant slots, spread evenly."""
    total = cfg.model_config.num_experts + cfg.eplb.num_redundant_experts
    return -(-total // cfg.parallel.expert_groups)


def placement_for_loads(cfg: EngineConfig, loads_LE: torch.Tensor, version: int) -> LayeredPlacement:
    mc, g = cfg.model_config, cfg.parallel.expert_groups
    phy2log, share = balanced_placement(loads_LE.double(), g, slots_per_group(cfg),
                                        mc.num_experts + cfg.eplb.num_redundant_experts)
    return LayeredPlacement.from_tensors(phy2log, share, g, version)


def initial_placement(cfg: EngineConfig) -> ExpertPlacement | LayeredPlacement:
    """Contiguous homes by default; with EPLB, a balanced placement of the saved loads (or
    of uniform loads). Every rank computes the same result from the same config."""
    mc = cfg.model_config
    if not cfg.eplb.replicated:
        return contiguous_placement(mc.num_experts, cfg.parallel.expert_groups)
    loads = load_file(cfg.eplb.expert_load_file, mc.num_layers, mc.num_experts) if cfg.eplb.expert_load_file \
        else torch.ones(mc.num_layers, mc.num_experts, dtype=torch.float64)
    return placement_for_loads(cfg, loads, version=0)


def load_file(path: str, num_layers: int, num_experts: int) -> torch.Tensor:
    """Loads [L, E] saved as JSON ``{"loads": [[...], ...]}`` (what ``save_loads`` writes)."""
    with open(path) as f:
        loads = torch.tensor(json.load(f)["loads"], dtype=torch.float64)
    if tuple(loads.shape) != (num_layers, num_experts):
        raise ConfigError(f"expert load file {path!r} has shape {list(loads.shape)}, the model needs "
                          f"[{num_layers}, {num_experts}]")
    return loads


def save_loads(path: str, loads_LE: torch.Tensor) -> None:
    with open(path, "w") as f:
        json.dump({"loads": loads_LE.tolist()}, f)


def placement_group_loads(placement: ExpertPlacement | LayeredPlacement, loads_LE: torch.Tensor) -> torch.Tensor:
    """[L, G] tokens each expert group receives under ``placement``."""
    if isinstance(placement, ExpertPlacement):
        g = torch.tensor(placement.group_of_expert)
        out = torch.zeros(loads_LE.shape[0], placement.num_groups, dtype=torch.float64)
        return out.index_add_(1, g, loads_LE.double())
    phy2log = torch.tensor([p.phy2log for p in placement.layers])
    share = torch.tensor([p.share for p in placement.layers], dtype=torch.float64)
    return group_loads(phy2log, share, loads_LE, placement.layers[0].slots_per_group)


class LoadWindow:
    """Routed tokens per (layer, expert) over the last ``size`` reports of any replica."""

    def __init__(self, num_layers: int, num_experts: int, size: int):
        self.reports: deque[torch.Tensor] = deque(maxlen=size)
        self.shape = (num_layers, num_experts)

    def add(self, counts_LE: torch.Tensor) -> None:
        self.reports.append(counts_LE.double())

    def loads(self) -> torch.Tensor:
        if not self.reports:
            return torch.zeros(self.shape, dtype=torch.float64)
        return torch.stack(list(self.reports)).sum(0)

    def balancedness(self, placement) -> float:
        """Mean over layers of mean/max group load (1.0 when no tokens were seen)."""
        loads = self.loads()
        if float(loads.sum()) == 0:
            return 1.0
        per_layer = placement_group_loads(placement, loads)
        return sum(balancedness(row) for row in per_layer) / per_layer.shape[0]
