from __future__ import annotations

import argparse
import json

import pytest

from afdserve.planner.core import Plan
from afdserve.planner.plan_file import load_plan, plan_to_dict, write_plan

PLAN = Plan(layout="afd", attn_gpu="H20", expert_gpu="L40S", tp_a=4, n_a=2, tp_e=2, n_e=8, m=3, b_a=100,
            t_a_s=1e-3, t_e_s=1e-3, t_c_s=2e-4, step_s=0.14, num_gpus=24, cost=25.1, power_w=8800,
            attn_mem_frac=0.8, expert_mem_frac=0.7, limited_by="slo")


def test_round_trip_gives_runtime_option_values(tmp_path):
    path = str(tmp_path / "plan.json")
    write_plan(path, PLAN, "Mixtral-8x22B", {"slo_s": 0.15})
    assert load_plan(path) == {"attn_groups": 2, "attn_tp": 4, "expert_groups": 8, "expert_tp": 2,
                               "micro_batches": 3, "max_num_seqs": 300, "layout": "afd"}
    d = json.loads(open(path).read())
    assert d["hardware"] == {"attn_gpu": "H20", "expert_gpu": "L40S"} and d["predicted"]["global_batch"] == 600


def test_keys_are_the_runtime_cli_destinations(tmp_path):
    from afdserve.__main__ import add_engine_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    dests = {a.dest for a in p._actions}
    path = str(tmp_path / "plan.json")
    write_plan(path, PLAN, "m")
    assert set(load_plan(path)) <= dests


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["parallel"].update(attn_groups=0), "attn_groups"),
    (lambda d: d["parallel"].update(expert_tp=1.5), "expert_tp"),
    (lambda d: d["parallel"].update(layout="pipeline"), "layout"),
    (lambda d: d["parallel"].update(afd_transport="rdma"), "afd_transport"),
    (lambda d: d["scheduler"].pop("max_num_seqs"), "max_num_seqs"),
])
def test_bad_plan_files(tmp_path, edit, match):
    d = plan_to_dict(PLAN, "m")
    edit(d)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        load_plan(str(path))


def test_colocated_plan_file_starts_the_colocated_layout(tmp_path, tiny_models):
    from dataclasses import replace

    from afdserve.config import make_config

    path = str(tmp_path / "plan.json")
    write_plan(path, replace(PLAN, layout="colocated", n_a=2, tp_a=1, n_e=2, tp_e=1, m=1), "tiny")
    cfg = make_config(tiny_models["mixtral"], **load_plan(path))
    assert cfg.parallel.colocated and cfg.parallel.multi_process and not cfg.parallel.disaggregated
    assert (cfg.parallel.attn_groups, cfg.parallel.expert_groups) == (2, 2)


def test_plan_file_can_force_the_transport(tmp_path, tiny_models):
    from afdserve.config import make_config

    d = plan_to_dict(PLAN, "m")
    d["parallel"]["afd_transport"] = "p2p"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    opts = load_plan(str(path))
    assert opts["afd_transport"] == "p2p"
    opts |= {"attn_tp": 1, "expert_tp": 1, "expert_groups": 2}  # what the tiny model allows
    assert make_config(tiny_models["mixtral"], **opts).parallel.afd_transport == "p2p"
