from __future__ import annotations

import argparse
import json

import pytest

from afdserve.planner.cli import register
from afdserve.planner.plan_file import load_plan
from afdserve.planner.profile import load_profile


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="afdserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_prints_table_and_writes_plan_file(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert _run(["plan", "--model", "Mixtral-8x22B", "--attn-gpu", "H20", "--expert-gpu", "L40S", "--slo-ms", "150",
                 "--avg-seq-len", "730", "--top", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tok/s/cost" in text and "Colocated baseline" in text and "Ruled out" in text
    opts = load_plan(str(out))
    assert opts["layout"] == "afd" and opts["expert_groups"] >= 1
    assert json.loads(out.read_text())["hardware"] == {"attn_gpu": "H20", "expert_gpu": "L40S"}


def test_simulate_sweep_writes_png_and_json(tmp_path, capsys):
    assert _run(["simulate", "--model", "Mixtral-8x22B", "--attn-gpu", "H20", "--expert-gpu", "L40S",
                 "--attn-groups", "2", "--attn-tp", "4", "--expert-groups", "8", "--expert-tp", "2",
                 "--micro-batches", "3", "--max-num-seqs", "600", "--steps", "2", "--sweep", "m",
                 "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sweep_m.json").read_text())["rows"]
    assert [r["m"] for r in rows] == [1, 2, 3, 4] and (tmp_path / "sweep_m.png").stat().st_size > 1000
    assert rows[0]["utilisation"]["expert"] < rows[2]["utilisation"]["expert"]


def test_simulate_a_plan_file_with_skew(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert _run(["plan", "--model", "Mixtral-8x22B", "--attn-gpu", "H20", "--expert-gpu", "L40S",
                 "--top", "1", "--out", str(plan)]) == 0
    capsys.readouterr()
    assert _run(["simulate", "--model", "Mixtral-8x22B", "--plan", str(plan), "--steps", "3", "--skew", "1.0",
                 "--seq-len-cv", "0.5"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["tbt_s"]["p99"] >= result["tbt_s"]["p50"] > 0


def test_bad_inputs_exit_2(capsys):
    assert _run(["plan", "--model", "Mixtral-8x22B", "--attn-gpu", "H21", "--expert-gpu", "L40S"]) == 2
    assert "unknown GPU 'H21'" in capsys.readouterr().err
    assert _run(["plan", "--model", "nope", "--attn-gpu", "H20", "--expert-gpu", "L40S"]) == 2


def test_profile_then_plan_with_it(tmp_path, capsys):
    model = tmp_path / "tinymoe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256, "vocab_size": 100}))
    prof = tmp_path / "profile.json"
    assert _run(["profile", "--model", str(model), "--gpu", "H20", "--device", "cpu", "--no-comm",
                 "--batch-sizes", "1,4", "--seq-lens", "16,64", "--token-counts", "4,32", "--iters", "1",
                 "--tp", "1,2", "--out", str(prof)]) == 0
    p = load_profile(str(prof))
    assert p.gpu == "H20" and set(p.attn["tinymoe"]) == {1, 2} and set(p.expert["tinymoe"]) == {1, 2}
    assert _run(["plan", "--model", str(model), "--attn-gpu", "H20", "--expert-gpu", "H20", "--profile", str(prof),
                 "--tp", "1,2", "--slo-ms", "1000", "--out", str(tmp_path / "plan.json")]) == 0
    assert "profile" in json.loads((tmp_path / "plan.json").read_text())["predicted"]["coeff_source"]


@pytest.mark.parametrize("name,expected", [("NVIDIA H20", "H20"), ("NVIDIA H200", "H200"),
                                           ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA L40S", "L40S"),
                                           ("NVIDIA GeForce RTX 4090", None)])
def test_guess_gpu(name, expected):
    from afdserve.planner.measure_cli import guess_gpu

    assert guess_gpu(name) == expected


def test_link_rate_comes_from_the_profile_of_that_gpu_unless_given(tmp_path):
    """T_c uses the transport rate a profile measured on that GPU type (its utilisation curve is
    relative to it); --net-gb-per-s overrides it; other GPU types keep the catalog's."""
    import os

    from afdserve.planner.hardware import get_gpu

    PROFILE = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "profile_2xH200.json")
    link = load_profile(PROFILE).link_gb_per_s
    assert link and link != get_gpu("H200").net_gb_per_s
    base = ["plan", "--model", "Mixtral-8x7B", "--expert-gpu", "H200", "--profile", PROFILE, "--slo-ms", "150",
            "--avg-seq-len", "650", "--tp", "1", "--top", "1"]
    cases = [(["--attn-gpu", "H200"], [link], [link]), (["--attn-gpu", "H100"], [get_gpu("H100").net_gb_per_s], [link]),
             (["--attn-gpu", "H200", "--net-gb-per-s", "12"], [12.0], [12.0])]
    for i, (extra, attn, expert) in enumerate(cases):
        out = tmp_path / f"plan{i}.json"
        assert _run(base + extra + ["--out", str(out)]) == 0
        net = json.loads(out.read_text())["inputs"]["net_gb_per_s"]
        assert net == {"attn": pytest.approx(attn), "expert": pytest.approx(expert)}
