from __future__ import annotations

import json

import pytest

from afdserve.planner.hardware import CATALOG, get_gpu, load_catalog, load_user_gpus


def test_table3_per_cost_columns():
    """The paper's Table 3 per-cost rows follow from the catalog's raw columns."""
    per_cost = {name: (g.memory_gb / g.price_rel, g.mem_bw_gb_per_s / g.price_rel, g.bf16_tflops / g.price_rel)
                for name, g in CATALOG.items()}
    assert per_cost["H20"] == pytest.approx((51.9, 2214.1, 80.0), abs=0.1)
    assert per_cost["L40S"] == pytest.approx((44.4, 800.0, 335.2), abs=0.1)
    assert per_cost["H800"] == pytest.approx((15.2, 649.7, 187.3), abs=0.1)
    assert per_cost["A800"] == pytest.approx((35.4, 902.2, 138.1), abs=0.1)
    assert per_cost["L20"] == pytest.approx((48.0, 864.0, 119.5), abs=0.1)
    # the paper's heterogeneous pairing: H20 best on bandwidth per cost, L40S on compute per cost
    assert max(per_cost, key=lambda n: per_cost[n][1]) == "H20"
    assert max(per_cost, key=lambda n: per_cost[n][2]) == "L40S"


def test_lookup_is_case_insensitive_and_errors_list_names():
    assert get_gpu("h20") is CATALOG["H20"]
    with pytest.raises(ValueError, match="L40S"):
        get_gpu("no-such-gpu")


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_user_file_adds_gpus_and_overrides_prices(tmp_path, suffix):
    new = {"price_rel": 1.5, "memory_gb": 64, "mem_bw_gb_per_s": 1600, "bf16_tflops": 400, "power_w": 450,
           "net_gb_per_s": 25, "intra_gb_per_s": 64}
    path = tmp_path / f"gpus{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"MyGPU": new, "h20": {"price_rel": 1.2}}))
    else:
        body = "\n".join(f"{k} = {v}" for k, v in new.items())
        path.write_text(f"[MyGPU]\n{body}\n\n[H20]\nprice_rel = 1.2\n")
    cat = load_user_gpus(str(path))
    assert cat["MyGPU"].bf16_tflops == 400 and cat["H20"].price_rel == 1.2
    assert cat["H20"].memory_gb == CATALOG["H20"].memory_gb  # only the given fields change
    assert CATALOG["H20"].price_rel == 1.85  # the built-in catalog is untouched
    assert load_catalog(str(path))["MyGPU"].name == "MyGPU"


def test_user_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"X": {"price_rel": 1.0}}))
    with pytest.raises(ValueError, match="needs fields"):
        load_user_gpus(str(bad))
    bad.write_text(json.dumps({"H20": {"prize": 1.0}}))
    with pytest.raises(ValueError, match="unknown fields"):
        load_user_gpus(str(bad))
    bad.write_text(json.dumps({"H20": {"price_rel": 0}}))
    with pytest.raises(ValueError, match="must be > 0"):
        load_user_gpus(str(bad))
