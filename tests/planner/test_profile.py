from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from afdserve.planner.hardware import get_gpu
from afdserve.planner.measure import fit_nonneg, measure_attn, measure_expert
from afdserve.planner.models import PRESETS, MoEShape
from afdserve.planner.perf_model import AttnCoeffs, ExpertCoeffs, roofline_attn_coeffs
from afdserve.planner.profile import CoeffSource, Profile, load_profile, save_profile

SHAPE = PRESETS["Mixtral-8x22B"]
TINY = MoEShape("tiny", hidden=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, num_experts=4,
                top_k=2, expert_intermediate=1024, vocab=100)


def _profile() -> Profile:
    return Profile("NVIDIA H20", "H20", "bfloat16", {SHAPE.name: {1: AttnCoeffs(1e-6, 1e-9, 5e-5)}},
                   {SHAPE.name: {2: ExpertCoeffs(2e-6, 4e-4, 1e-5)}}, ((1024.0, 0.1), (1048576.0, 0.9)), 20.0, "nccl")


def test_save_load_round_trip(tmp_path):
    path = str(tmp_path / "p.json")
    save_profile(path, _profile())
    got = load_profile(path)
    assert got.attn[SHAPE.name][1] == AttnCoeffs(1e-6, 1e-9, 5e-5, "profile")
    assert got.expert[SHAPE.name][2] == ExpertCoeffs(2e-6, 4e-4, 1e-5, "profile")
    assert got.util_curve == ((1024.0, 0.1), (1048576.0, 0.9)) and got.link_gb_per_s == 20.0
    assert json.load(open(path))["models"][SHAPE.name]["attn"]["1"]["k2_s"] == 5e-5


def test_coefficients_come_from_profile_then_scaled_then_roofline():
    src = CoeffSource((_profile(),))
    h20, l40s = get_gpu("H20"), get_gpu("L40S")
    assert src.attn(SHAPE, h20, 1).source == "profile"
    scaled = src.attn(SHAPE, h20, 4)
    assert scaled.k2_s == pytest.approx(5e-5 / 4) and "scaled" in scaled.source
    assert src.expert(SHAPE, h20, 1).k3_s_per_token == pytest.approx(4e-6)  # measured at tp 2
    assert src.attn(SHAPE, l40s, 1) == roofline_attn_coeffs(SHAPE, l40s, 1)
    assert src.util_curve() == _profile().util_curve


def test_fit_recovers_costs_and_refuses_negative_ones():
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.uniform(1, 100, 20), rng.uniform(1, 4, 20), np.ones(20)])
    assert fit_nonneg(x, x @ np.array([2e-6, 3e-4, 1e-5])) == pytest.approx([2e-6, 3e-4, 1e-5])
    c = fit_nonneg(x, x @ np.array([2e-6, -1e-4, 1e-3]))
    assert (c >= 0).all() and c[1] == 0


def test_measuring_the_engine_layers_on_cpu():
    """The coefficients are the non-negative least-squares fit of the timings taken (exact), and
    the timings have the expected shape. No bound relates a fit to one timing: on a busy 2-core
    machine a single median can be off by several times."""
    dev = torch.device("cpu")
    a, a_samples = measure_attn(TINY, 1, (1, 8), (32, 256), dev, torch.float32, iters=5)
    e, e_samples = measure_expert(TINY, 1, (8, 1024), dev, torch.float32, iters=5)
    assert [(b, s) for b, s, _ in a_samples] == [(1, 32), (1, 256), (8, 32), (8, 256)]
    assert [(p, c) for p, c, _ in e_samples] == [(8, 1), (1024, 1), (8, 2), (1024, 2)]
    x = np.array([[b, b * s, 1.0] for b, s, _ in a_samples])
    assert (a.k1_s_per_token, a.k1_s_per_token_ctx, a.k2_s) == pytest.approx(
        tuple(fit_nonneg(x, np.array([t for *_, t in a_samples]))))
    x = np.array([[p, c, 1.0] for p, c, _ in e_samples])
    assert (e.k3_s_per_token, e.k4_s_per_expert, e.overhead_s) == pytest.approx(
        tuple(fit_nonneg(x, np.array([t for *_, t in e_samples]))))
    assert all(t > 0 for *_, t in a_samples + e_samples) and a.source == e.source == "profile"
    assert e.k3_s_per_token > 0  # 128x more rows (a 1024-row GEMM against an 8-row one) costs more


def test_transport_utilisation_curve():
    from afdserve.planner.measure_comm import measure_util_curve

    curve, best_gb_per_s = measure_util_curve(hidden=256, max_bytes=256 << 10, iters=2, timeout_s=120)
    sizes = [x for x, _ in curve]
    assert sizes == sorted(sizes) and sizes[0] == 1024 and sizes[-1] == 256 << 10
    utils = [u for _, u in curve]
    assert utils[-1] == 1.0 and all(0 < u <= 1 for u in utils) and best_gb_per_s > 0
    assert utils == sorted(utils)


def test_isotonic_smoothing():
    from afdserve.planner.measure_comm import isotonic

    assert isotonic([0.1, 0.3, 0.2, 0.5, 0.4, 1.0]) == pytest.approx([0.1, 0.25, 0.25, 0.45, 0.45, 1.0])


def test_row_split_cost_round_trip_and_lookup(tmp_path):
    """The measured row split by expert group (per token and per call, per number of groups):
    saved, loaded, used for that GPU and model only, nearest group count, nothing when absent."""
    from afdserve.planner.perf_model import RouteCoeffs
    route = RouteCoeffs(((1, 0.0, 5e-5), (2, 1e-8, 6e-4)))
    path = str(tmp_path / "p.json")
    save_profile(path, replace(_profile(), route={SHAPE.name: route}))
    got = load_profile(path)
    assert got.route == {SHAPE.name: route}
    src = CoeffSource((got,))
    assert src.route(SHAPE, get_gpu("H20")) == route and src.route(SHAPE, get_gpu("L40S")) == RouteCoeffs()
    assert route.time_s(100, 1) == pytest.approx(5e-5)
    assert route.time_s(100, 4) == route.time_s(100, 2) == pytest.approx(1e-6 + 6e-4)  # nearest measured: 2
    assert RouteCoeffs().time_s(100, 2) == 0.0
    assert CoeffSource((_profile(),)).route(SHAPE, get_gpu("H20")) == RouteCoeffs()  # a profile without one


def test_measuring_the_row_split_on_cpu():
    from afdserve.planner.measure import measure_route
    route, samples = measure_route(TINY, (1, 2), (4, 64), torch.device("cpu"), torch.float32, iters=2)
    assert [g for g, *_ in route.by_groups] == [1, 2] and len(samples) == 4
    assert all(tok >= 0 and call >= 0 for _, tok, call in route.by_groups)
    assert route.time_s(64, 2) > 0


def test_planner_adds_the_row_split_to_the_attention_side():
    """With a measured row split the planner's T_a (AFD and colocated EP) grows by it."""
    from afdserve.planner.colocated import colocated_ep_stages
    from afdserve.planner.core import PlanRequest, SearchSpace
    from afdserve.planner.perf_model import AfdLayout, Hardware, RouteCoeffs, afd_stage_times_s
    route = RouteCoeffs(((1, 0.0, 5e-5), (2, 1e-8, 6e-4)))
    h20 = get_gpu("H20")
    prof = _profile()
    reqs = [PlanRequest(SHAPE, (h20,), (h20,), 0.15, 700.0, CoeffSource((p,)), SearchSpace())
            for p in (prof, replace(prof, route={SHAPE.name: route}))]
    plain, split = (colocated_ep_stages(r, h20, 2, 64.0) for r in reqs)
    assert split[0] - plain[0] == pytest.approx(route.time_s(64, 2)) and split[1:] == plain[1:]
    a, e = reqs[0].coeffs.attn(SHAPE, h20, 1), reqs[0].coeffs.expert(SHAPE, h20, 1)
    lay = AfdLayout(1, 2, 1, 2, 2)
    t0 = afd_stage_times_s(SHAPE, lay, Hardware(h20, h20, a, e), 32.0, 700.0)
    t1 = afd_stage_times_s(SHAPE, lay, Hardware(h20, h20, a, e, route=route), 32.0, 700.0)
    assert t1[0] - t0[0] == pytest.approx(route.time_s(32, 2)) and t1[1:] == t0[1:]
