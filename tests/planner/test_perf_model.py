from __future__ import annotations

import math

import pytest

from afdserve.planner.hardware import get_gpu
from afdserve.planner.models import PRESETS
from afdserve.planner.perf_model import (
    DEFAULT_UTIL_CURVE,
    AfdLayout,
    AttnCoeffs,
    ExpertCoeffs,
    Hardware,
    afd_stage_times_s,
    attn_memory_bytes,
    balanced_attn_groups,
    expert_time_s,
    groups_per_token,
    iter_latency_bounds_s,
    kv_bytes_per_seq,
    min_micro_batches,
    pipeline_conditions,
    roofline_attn_coeffs,
    roofline_expert_coeffs,
    step_time_s,
    transfer_time_s,
    util_at,
)

SHAPE = PRESETS["Mixtral-8x22B"]


def test_roofline_follows_datasheet_ratios():
    h20, l40s = get_gpu("H20"), get_gpu("L40S")
    a_h20, a_l40s = roofline_attn_coeffs(SHAPE, h20, 1), roofline_attn_coeffs(SHAPE, l40s, 1)
    # KV reads are bandwidth-bound: 4096 vs 864 GB/s
    assert a_l40s.k1_s_per_token_ctx / a_h20.k1_s_per_token_ctx == pytest.approx(4096 / 864)
    e_h20, e_l40s = roofline_expert_coeffs(SHAPE, h20, 1), roofline_expert_coeffs(SHAPE, l40s, 1)
    assert e_h20.k3_s_per_token / e_l40s.k3_s_per_token == pytest.approx(362 / 148)  # GEMM FLOPs
    assert e_l40s.k4_s_per_expert == pytest.approx(SHAPE.expert_layer_bytes / (864e9 * 0.8))  # weight read
    # tensor parallelism divides the per-GPU work (plus an all-reduce)
    e2 = roofline_expert_coeffs(SHAPE, l40s, 2)
    assert e2.k4_s_per_expert == pytest.approx(e_l40s.k4_s_per_expert / 2)
    assert e_l40s.k3_s_per_token / 2 < e2.k3_s_per_token < e_l40s.k3_s_per_token


def test_linear_time_models():
    a = AttnCoeffs(1e-6, 1e-9, 5e-5)
    assert a.k1_s(1000) == pytest.approx(2e-6)
    e = ExpertCoeffs(2e-6, 1e-4, 1e-5)
    assert expert_time_s(100, 2, e) == pytest.approx(2e-4 + 2e-4 + 1e-5)


def test_util_curve_interpolates_in_log_size_and_clamps():
    curve = ((1e3, 0.1), (1e5, 0.5), (1e7, 0.9))
    assert util_at(curve, 1e4) == pytest.approx(0.3)
    assert util_at(curve, 1) == 0.1 and util_at(curve, 1e9) == 0.9
    assert transfer_time_s(1e5, 10, curve) == pytest.approx(1e5 / (10e9 * 0.5))
    assert transfer_time_s(0, 10, curve) == 0
    sizes = [x for x, _ in DEFAULT_UTIL_CURVE]
    assert all(util_at(DEFAULT_UTIL_CURVE, a) < util_at(DEFAULT_UTIL_CURVE, b) for a, b in zip(sizes, sizes[1:]))


def test_rows_per_token_with_expert_groups():
    assert groups_per_token(8, 2, 8) == pytest.approx(2)
    assert groups_per_token(8, 2, 1) == pytest.approx(1)
    # 4 groups of 2 experts: a token misses a group with prob C(6,2)/C(8,2) = 15/28
    assert groups_per_token(8, 2, 4) == pytest.approx(4 * (1 - 15 / 28))


def test_equations_4_and_5():
    assert step_time_s(2.0, 3.0, 0.5, 3, 10) == pytest.approx(6.0 + 3.0 * 29)
    lo, hi = iter_latency_bounds_s(2.0, 2.0, 0.5, 3, 10)
    assert (lo, hi) == pytest.approx((5.0 + 3 * 2.0 * 9, 3 * 2.0 * 10))
    assert math.ceil(min_micro_batches(1.0, 1.0, 0.49)) == 3  # fast link: m >= 3
    assert math.ceil(min_micro_batches(1.0, 1.0, 0.6)) == 4  # slow link: m >= 4
    cond = pipeline_conditions(1.0, 0.9, 0.3, 3)
    assert cond == {"balanced": True, "comm_hidden": True, "enough_micro_batches": True}
    assert not pipeline_conditions(1.0, 0.5, 1.2, 2)["comm_hidden"]


def test_balance_rule():
    assert balanced_attn_groups(2e-6, 1e-6, 8, 2) == pytest.approx(8)


def test_memory_in_bytes():
    assert kv_bytes_per_seq(SHAPE, 730) == 730 * 56 * 4 * 8 * 128
    assert attn_memory_bytes(SHAPE, 3, 10, 730) == 30 * 730 * 56 * 4096 + SHAPE.attn_params_bytes
    qwen = PRESETS["Qwen3-30B-A3B"]  # 4 kv heads: tp 8 replicates each twice
    assert kv_bytes_per_seq(qwen, 100, 8) == 2 * kv_bytes_per_seq(qwen, 100, 4)


def test_stage_times_with_one_expert_per_group_follow_the_paper():
    h20, l40s = get_gpu("H20"), get_gpu("L40S")
    a, e = AttnCoeffs(1e-6, 0, 1e-4), ExpertCoeffs(2e-6, 3e-4, 0)
    curve = ((1.0, 0.5), (1e9, 0.5))
    lay = AfdLayout(tp_a=2, n_a=4, tp_e=1, n_e=8, m=3)
    t_a, t_e, t_c = afd_stage_times_s(SHAPE, lay, Hardware(h20, l40s, a, e, curve), 100, 730)
    b_e = 100 * 4 * 2 / 8  # b_e = b_a n_a K / E
    assert (t_a, t_e) == pytest.approx((1e-4 + 1e-4, 2e-6 * b_e + 3e-4))
    send = 100 * SHAPE.hidden * 2 * 2 / 2 / (25e9 * 0.5)  # b_a h K / tp_a bytes at W_a
    recv = b_e * SHAPE.hidden * 2 / 1 / (12.5e9 * 0.5)  # b_e h / tp_e bytes at W_e
    assert t_c == pytest.approx(max(send, recv))
    # the same experts in 4 groups of 2: twice the pairs and weights per group
    _, t_e4, _ = afd_stage_times_s(SHAPE, AfdLayout(2, 4, 1, 4, 3), Hardware(h20, l40s, a, e, curve), 100, 730)
    assert t_e4 == pytest.approx(2 * t_e)
