"""benchmarks/scaling_sim.py (issue 8's Fig. 15 analogue on CPU): its sweep on a tiny grid."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from afdserve.planner.hardware import get_gpu  # noqa: E402
from afdserve.planner.perf_model import AfdLayout  # noqa: E402
from afdserve.planner.profile import load_profile  # noqa: E402
from benchmarks import scaling_sim as ss  # noqa: E402

PROFILE = os.path.join(ROOT, "benchmarks", "results", "profile_2xH200.json")
SLO_S = 0.150


@pytest.fixture(scope="module")
def req():
    return ss.make_request(load_profile(PROFILE), ss.avg_context(571, 159), SLO_S)


@pytest.fixture(scope="module")
def rows(req):
    return ss.sweep(req, n_as=(1, 2), ms=(1, 3))


def points(rows):
    return [(r, p) for r in rows for p in r["afd"]]


def test_average_context_is_input_plus_half_output():
    assert ss.avg_context(571, 159) == 650.5 and ss.avg_context(2048, 512) == 2304


def test_link_speed_comes_from_the_profile_unless_asked(req):
    prof = load_profile(PROFILE)
    assert req.attn_gpus[0].net_gb_per_s == pytest.approx(prof.link_gb_per_s)
    catalog = ss.make_request(prof, 650.5, SLO_S, profile_link=False)
    assert catalog.attn_gpus[0].net_gb_per_s == get_gpu("H200").net_gb_per_s != prof.link_gb_per_s


def test_grid_and_positive_throughput(rows):
    assert [r["n_a"] for r in rows] == [1, 2]
    assert [[p["m"] for p in r["afd"]] for r in rows] == [[1, 3], [1, 3]]
    for r, p in points(rows):
        assert p["b_a"] >= 1 and p["tok_s_per_gpu"] > 0 and p["sim_tok_s_per_gpu"] > 0
        # tokens/s per GPU = B / step / G, with B = b_a·m·n_a and G = n_a + 1
        assert p["tok_s_per_gpu"] * p["step_s"] * r["num_gpus"] == pytest.approx(p["b_a"] * p["m"] * r["n_a"])
        assert r["best_tok_s_per_gpu"] == max(q["tok_s_per_gpu"] for q in r["afd"])


def test_batch_is_the_largest_meeting_slo_and_memory(req, rows):
    _, hw = ss.afd_sides(req)
    for r, p in points(rows):
        assert p["step_s"] <= SLO_S and p["b_a"] <= p["b_a_memory"]
        if p["limited_by"] == "slo":
            lay = AfdLayout(1, r["n_a"], 1, 1, p["m"])
            assert ss.model_step_s(req, lay, hw, p["b_a"] + 1) > SLO_S
        else:
            assert p["b_a"] == p["b_a_memory"]


def test_simulator_agrees_with_the_model(rows):
    for _, p in points(rows):
        assert p["sim_b_a"] == p["b_a"]
        assert p["sim_step_s_same_b"] == pytest.approx(p["step_s"], rel=1e-9)
        assert p["sim_tok_s_per_gpu"] == pytest.approx(p["tok_s_per_gpu"], rel=1e-9)


def test_eq5_exact_only_when_the_pipeline_is_full(rows):
    """m = 3 >= 2(1 + T_c/T_f) here: eq. 5 is the step; m = 1 overlaps nothing and is slower than eq. 5."""
    for _, p in points(rows):
        if p["m"] >= p["m_min"] and p["t_c_s"] <= max(p["t_a_s"], p["t_e_s"]):
            assert p["eq5_step_s"] == pytest.approx(p["step_s"], rel=1e-9)
        else:
            assert p["eq5_step_s"] < p["step_s"]
    assert {p["m"] for _, p in points(rows) if p["m"] >= p["m_min"]} == {3}


def test_colocated_on_the_same_gpus(req, rows):
    for r in rows:
        col = r["colocated"]
        assert col["num_gpus"] == r["num_gpus"] == r["n_a"] + 1
        assert col["b"] >= 1 and 0 < col["step_s"] <= SLO_S and col["tok_s_per_gpu"] > 0
        assert col["tok_s_per_gpu"] == pytest.approx(col["b"] / col["step_s"])
        # the script's colocated step at a given batch is the planner's at the batch it chose
        assert ss.colocated_step_s(req, col["num_gpus"], col["b"]) == pytest.approx(col["step_s"], rel=1e-12)
        assert r["ratio_best"] == pytest.approx(r["best_tok_s_per_gpu"] / col["tok_s_per_gpu"])


def test_measured_points_carry_the_model_at_their_batch(req):
    pts = ss.measured_points(req, 571, 159, SLO_S * 1e3)
    kinds = {p["kind"] for p in pts}
    assert kinds == {"afd", "colocated"} and all(p["gpus"] == 2 for p in pts)
    _, hw = ss.afd_sides(req)
    for p in pts:
        assert p["model_tok_s_per_gpu_at_b"] > 0 and p["meets_slo"] == (p["tbt_mean_ms"] <= 150.0)
        if p["kind"] == "afd":
            step = ss.model_step_s(req, AfdLayout(1, 1, 1, 1, p["m"]), hw, p["b"] / p["m"])
            assert p["model_step_ms_at_b"] == pytest.approx(1e3 * step)
