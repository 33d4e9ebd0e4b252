"""Discrete-event simulator of the ping-pong pipeline (DESIGN.md §8).

It replays ``afdserve.pipeline``'s op lists with op durations from the planner's performance
model: ``replay_fast`` (vectorised over nodes, used everywhere) and ``replay_events`` (one
event per op per node, the reference it is tested against).
"""

from afdserve.simulator.costs import SimCosts, Workload, build_costs, uniform_costs, zipf_expert_load
from afdserve.simulator.events import replay_events
from afdserve.simulator.replay import Trace, replay_fast
from afdserve.simulator.result import SimResult, summarize


def simulate(costs: SimCosts, tokens_per_step: float = 0.0) -> SimResult:
    """Replay ``costs`` with the fast path and summarise it."""
    return summarize(replay_fast(costs), tokens_per_step)


__all__ = ["SimCosts", "Workload", "build_costs", "uniform_costs", "zipf_expert_load", "replay_events",
           "replay_fast", "Trace", "SimResult", "summarize", "simulate"]
