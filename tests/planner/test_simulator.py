"""The simulator against equations 4 and 5, the fast path against the event replay, and the
qualitative claims of the paper (bubbles below the m threshold, the n_a balance peak, skew)."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest

from afdserve.planner.hardware import get_gpu
from afdserve.planner.models import MoEShape
from afdserve.planner.perf_model import (
    AfdLayout,
    AttnCoeffs,
    ExpertCoeffs,
    Hardware,
    afd_stage_times_s,
    iter_latency_bounds_s,
    min_micro_batches,
    step_time_lower_bound_s,
    step_time_s,
)
from afdserve.simulator import (
    SimCosts,
    Workload,
    build_costs,
    replay_events,
    replay_fast,
    simulate,
    summarize,
    uniform_costs,
    zipf_expert_load,
)
from afdserve.simulator.sweeps import SimSetup, sweep_attn_groups, sweep_skew


def _random_ideal(rng: random.Random) -> tuple[int, int, Fraction, Fraction, Fraction]:
    """(m, L, T_a, T_e, T_c) with T_c < T_f and m >= 2(1 + T_c/T_f), as exact fractions."""
    while True:
        m, layers = rng.randint(2, 6), rng.randint(1, 12)
        t_a, t_e = Fraction(rng.randint(1, 400), 100), Fraction(rng.randint(1, 400), 100)
        t_c = Fraction(rng.randint(0, 300), 100)
        if t_c < max(t_a, t_e) and m >= min_micro_batches(t_a, t_e, t_c):
            return m, layers, t_a, t_e, t_c


def test_step_time_equals_eq5_exactly():
    rng = random.Random(0)
    for _ in range(200):
        m, layers, t_a, t_e, t_c = _random_ideal(rng)
        end = replay_fast(uniform_costs(layers, m, t_a, t_e, t_c)).step_end_s[0, 0]
        assert isinstance(end, Fraction) and end == step_time_s(t_a, t_e, t_c, m, layers)


def test_step_time_equals_replay_in_every_regime():
    """The period formula against the replay, pipelines full or not, links faster or slower than
    the busier side, m = 1 included (nothing overlaps: L·(T_a + T_e + 2T_c))."""
    rng = random.Random(3)
    for _ in range(400):
        layers, m = rng.randint(1, 12), rng.randint(1, 4)
        t_a, t_e = Fraction(rng.randint(1, 400), 100), Fraction(rng.randint(1, 400), 100)
        t_c = Fraction(rng.randint(0, 600), 100)
        end = replay_fast(uniform_costs(layers, m, t_a, t_e, t_c)).step_end_s[0, 0]
        assert end == step_time_s(t_a, t_e, t_c, m, layers), (m, layers, t_a, t_e, t_c)
        if m == 1:
            assert end == layers * (t_a + t_e + 2 * t_c)


def test_event_replay_with_many_nodes_equals_eq5_exactly():
    rng = random.Random(1)
    for _ in range(25):
        m, layers, t_a, t_e, t_c = _random_ideal(rng)
        n_a, n_e = rng.randint(1, 3), rng.randint(1, 3)
        tr = replay_events(uniform_costs(layers, m, t_a, t_e, t_c, n_a, n_e))
        assert set(tr.step_end_s[0].tolist()) == {step_time_s(t_a, t_e, t_c, m, layers)}


def test_micro_batch_latency_within_eq4_bounds_when_balanced():
    rng, checked = random.Random(2), 0
    while checked < 60:
        m, layers, t_a, _, t_c = _random_ideal(rng)
        if not (t_c < t_a and m >= min_micro_batches(t_a, t_a, t_c)):  # conditions 1-3 with T_e = T_a
            continue
        checked += 1
        tr = replay_fast(uniform_costs(layers, m, t_a, t_a, t_c))
        lo, hi = iter_latency_bounds_s(t_a, t_a, t_c, m, layers)
        for lat in (tr.mb_done_s - tr.mb_start_s).ravel():
            assert lo <= lat <= hi


def test_eq4_upper_bound_needs_balance():
    """With T_a << T_e the last micro-batch starts (m-1)·T_a late but finishes with the experts:
    its latency exceeds m·T_f·L by 2T_c - (m-2)·T_a although eq. 3 holds."""
    t_a, t_e, t_c, m, layers = Fraction(1, 10), Fraction(1), Fraction(1, 2), 3, 2
    assert m >= min_micro_batches(t_a, t_e, t_c)
    tr = replay_fast(uniform_costs(layers, m, t_a, t_e, t_c))
    _, hi = iter_latency_bounds_s(t_a, t_e, t_c, m, layers)
    assert (tr.mb_done_s - tr.mb_start_s)[0, 0, -1] == hi + 2 * t_c - (m - 2) * t_a


def test_step_time_lower_bound_holds_for_any_costs():
    rng = random.Random(5)
    for _ in range(200):
        m, layers = rng.randint(1, 5), rng.randint(1, 8)
        t_a, t_e, t_c = (Fraction(rng.randint(1, 300), 100) for _ in range(3))
        end = replay_fast(uniform_costs(layers, m, t_a, t_e, t_c)).step_end_s[0, 0]
        bound = step_time_lower_bound_s(t_a, t_e, t_c, m, layers)
        assert end >= bound
        if t_c < max(t_a, t_e) and m >= min_micro_batches(t_a, t_e, t_c):
            assert end == bound == step_time_s(t_a, t_e, t_c, m, layers)


def test_without_overlap_a_step_is_every_layer_in_series():
    tr = replay_fast(uniform_costs(5, 1, Fraction(3), Fraction(2), Fraction(1)))
    assert tr.step_end_s[0, 0] == 5 * (3 + 2 + 2 * 1)


@pytest.mark.parametrize("t_c", [Fraction(3, 10), Fraction(7, 10)])
def test_bubbles_below_the_micro_batch_threshold(t_c):
    t_f, layers = Fraction(1), 40
    m_min = min_micro_batches(t_f, t_f, t_c)  # 2.6 or 3.4
    results = {m: summarize(replay_fast(uniform_costs(layers, m, t_f, t_f, t_c)), 1) for m in range(1, 6)}
    for m, r in results.items():
        if m < m_min:
            assert r.expert_bubble_frac > 0.05
            assert r.expert_util < 0.95
        else:
            assert r.expert_bubble_frac == 0
            assert r.expert_util > 0.98
    below = [r.expert_util for m, r in results.items() if m < m_min]
    above = [r.expert_util for m, r in results.items() if m >= m_min]
    assert max(below) < min(above)


def _random_costs(rng: np.random.Generator, uniform_nodes: bool = False) -> SimCosts:
    layers, m, n_a, n_e, steps = (int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(1, 4)),
                                  int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    if uniform_nodes:
        return SimCosts(layers, m, np.full((steps, n_a, m), 1.5), np.full((layers, n_e), 1.2), np.full(n_a, 0.4),
                        np.full(n_e, 0.4), n_a, n_e, steps, sample_s=0.3)
    return SimCosts(layers, m, rng.uniform(0.5, 2, (steps, n_a, m)), rng.uniform(0.5, 2, (layers, n_e)),
                    rng.uniform(0, 1.5, n_a), rng.uniform(0, 1.5, n_e), n_a, n_e, steps,
                    sample_s=float(rng.choice([0.0, 0.7])))


def test_fast_path_matches_event_replay():
    rng = np.random.default_rng(3)
    for _ in range(40):
        c = _random_costs(rng)
        fast, ref = replay_fast(c), replay_events(c)
        for name in fast.__dataclass_fields__:
            np.testing.assert_allclose(np.asarray(getattr(fast, name), dtype=float),
                                       np.asarray(getattr(ref, name), dtype=float), rtol=1e-12, err_msg=name)


def test_identical_nodes_reduce_to_one_representative():
    rng = np.random.default_rng(4)
    for _ in range(10):
        c = _random_costs(rng, uniform_nodes=True)
        scalar = SimCosts(c.num_layers, c.m, 1.5, 1.2, 0.4, 0.4, c.n_a, c.n_e, c.steps, sample_s=0.3)
        assert scalar.uniform and not c.uniform
        np.testing.assert_allclose(replay_fast(c).step_end_s.max(axis=1), replay_fast(scalar).step_end_s[:, 0])


def test_tbt_spread_follows_sequence_length_spread():
    c_flat = _toy_setup(n_a=2, alpha=0.0)
    c_cv = _toy_setup(n_a=2, alpha=0.0, seq_len_cv=0.8)
    flat = simulate(build_costs(c_flat.shape, c_flat.layout, c_flat.hw, c_flat.workload), 1)
    spread = simulate(build_costs(c_cv.shape, c_cv.layout, c_cv.hw, c_cv.workload), 1)
    assert np.ptp(flat.tbt_s) < 1e-12
    assert np.ptp(spread.tbt_s) > 0


def test_zipf_load_is_a_capped_distribution():
    for alpha in (0.0, 0.5, 1.0, 3.0):
        p = zipf_expert_load(8, 2, alpha)
        assert p.sum() == pytest.approx(1.0) and p.max() <= 0.5 + 1e-12 and (np.diff(p) <= 1e-15).all()
    assert np.allclose(zipf_expert_load(8, 2, 0.0), 1 / 8)


def _toy_shape() -> MoEShape:
    return MoEShape("toy", hidden=1024, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=128, num_experts=8,
                    top_k=2, expert_intermediate=2048, vocab=1000)


def _toy_setup(n_a: int, alpha: float, seq_len_cv: float = 0.0, k=(4e-6, 2e-5, 1e-6, 2e-5)) -> SimSetup:
    shape, gpu = _toy_shape(), get_gpu("H100")
    hw = Hardware(gpu, gpu, AttnCoeffs(k[0], 0.0, k[1]), ExpertCoeffs(k[2], k[3], 0.0))
    load = zipf_expert_load(8, 2, alpha) if alpha else None
    return SimSetup(shape, AfdLayout(1, n_a, 1, 8, 3), hw, Workload(64, 512, seq_len_cv, load, steps=3))


def test_skew_lowers_throughput_monotonically():
    alphas = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
    rows = sweep_skew(_toy_setup(n_a=4, alpha=0.0), alphas)
    tput = [r["throughput_tok_s"] for r in rows]
    assert all(a > b for a, b in zip(tput, tput[1:]))


@pytest.mark.parametrize("k1,k3", [(4e-6, 1e-6), (3e-6, 1.6e-6), (5e-6, 0.7e-6)])
def test_attention_groups_sweep_peaks_at_the_balance_point(k1, k3):
    setup = _toy_setup(n_a=1, alpha=0.0, k=(k1, 2e-6, k3, 2e-6))
    n_star = k1 * 8 / (k3 * 2)
    rows = sweep_attn_groups(setup, tuple(range(1, 3 * int(n_star) + 2)))
    best = max(rows, key=lambda r: r["tok_s_per_gpu"])["n_a"]
    assert abs(best - n_star) <= 1


def test_build_costs_without_skew_is_the_perf_model():
    s = _toy_setup(n_a=3, alpha=0.0)
    c = build_costs(s.shape, s.layout, s.hw, s.workload)
    assert c.uniform
    assert (c.attn_s, c.expert_s, c.a2e_s) == pytest.approx(
        afd_stage_times_s(s.shape, s.layout, s.hw, s.workload.b_a, s.workload.avg_seq_len))
