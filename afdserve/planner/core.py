"""The planner's nouns: what is asked (PlanRequest, SearchSpace), what comes back (Plan,
Rejection, SearchResult). No logic beyond derived numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

from afdserve.planner.hardware import GPU
from afdserve.planner.models import MoEShape
from afdserve.planner.profile import CoeffSource


@dataclass(frozen=True)
class SearchSpace:
    tp_values: tuple[int, ...] = (1, 2, 4, 8)
    max_micro_batches: int = 4  # N_m: the paper stops at 4 (more shrinks expert GEMMs)
    n_a_radius: int = 2  # attention groups tried: balance point n* and integers within this distance
    max_attn_groups: int = 1024
    expert_groups: tuple[int, ...] | None = None  # None: every n_e whose experts fit in memory
    usable_mem_frac: float = 0.9  # of GPU memory, for weights + KV (rest: activations, runtime)
    top: int = 10  # plans kept (exactly the best ones: see search.search)

    def __post_init__(self) -> None:
        if self.max_micro_batches < 1 or not self.tp_values or min(self.tp_values) < 1:
            raise ValueError("max_micro_batches and tp_values must be >= 1")


@dataclass(frozen=True)
class PlanRequest:
    shape: MoEShape
    attn_gpus: tuple[GPU, ...]  # the search tries each role on each GPU given (heterogeneous plans)
    expert_gpus: tuple[GPU, ...]
    slo_s: float  # time between tokens
    avg_seq_len: float
    coeffs: CoeffSource = field(default_factory=CoeffSource)
    space: SearchSpace = field(default_factory=SearchSpace)
    sample_s: float = 0.0  # lm_head + sampling per step, added to the step time
    # routing skew: per-expert pick shares [E] or [L, E] (None: uniform); experts are then placed
    # by afdserve.expert.balance with this many redundant slots, as the runtime's EPLB does
    expert_load: object = field(default=None, compare=False)
    num_redundant_experts: int = 0

    def __post_init__(self) -> None:
        if self.slo_s <= 0 or self.avg_seq_len <= 0:
            raise ValueError("slo_s and avg_seq_len must be > 0")


@dataclass(frozen=True)
class Plan:
    layout: str  # "afd", "colocated" (DP attention + EP, one process per GPU) or "colocated-tp"
    attn_gpu: str
    expert_gpu: str
    tp_a: int
    n_a: int
    tp_e: int
    n_e: int
    m: int
    b_a: int  # sequences per micro-batch per attention group
    t_a_s: float  # per layer per micro-batch
    t_e_s: float
    t_c_s: float
    step_s: float  # = time between tokens (simulated for afd)
    num_gpus: int
    cost: float  # sum of relative GPU prices
    power_w: float
    attn_mem_frac: float  # of the attention group's memory used by weights + KV
    expert_mem_frac: float
    limited_by: str  # "slo" or "memory": what stopped the batch from growing
    conditions: dict = field(default_factory=dict)
    coeff_source: str = "roofline"

    @property
    def global_batch(self) -> int:
        return self.b_a * self.m * self.n_a

    @property
    def max_num_seqs(self) -> int:
        """Running requests per attention group: one decode token each per step."""
        return self.b_a * self.m

    @property
    def throughput_tok_s(self) -> float:
        return self.global_batch / self.step_s

    @property
    def tok_s_per_gpu(self) -> float:
        return self.throughput_tok_s / self.num_gpus

    @property
    def tok_s_per_cost(self) -> float:
        return self.throughput_tok_s / self.cost

    @property
    def tok_s_per_kw(self) -> float:
        return self.throughput_tok_s / (self.power_w / 1e3)


@dataclass(frozen=True)
class Rejection:
    """A part of the search space a constraint ruled out, and why."""

    role: str  # "attention", "expert" or "colocated"
    gpu: str
    tp: int
    what: str  # e.g. "n_e=4 (2 experts per group)"
    reason: str


@dataclass
class SearchResult:
    plans: list[Plan]  # best first, by throughput per cost
    baselines: list[Plan]  # colocated, best first
    rejections: list[Rejection]
    candidates: int = 0  # (GPU, tp, n_e, m, n_a) points bounded analytically
    simulated: int = 0  # simulator replays run by the batch searches
