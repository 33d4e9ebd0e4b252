"""The command line as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "afdserve", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_make_tiny_then_generate(tmp_path):
    out = str(tmp_path / "tiny")
    r = _run("make-tiny", "--family", "qwen2_moe", "--out", out, "--shards", "2")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    r = _run("generate", "--model", out, "--prompt", "Hello", "--max-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert "output:" in r.stdout and ("(length)" in r.stdout or "(stop)" in r.stdout)
    assert "loading weights" in r.stderr  # the progress bar


def test_generate_defaults_to_builtin_tiny_model(tmp_path):
    r = _run("generate", "--prompt", "Hi", "--max-tokens", "3", env={"AFDSERVE_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "tiny-qwen3_moe" / "config.json")


def test_bad_model_dir_is_a_clear_error(tmp_path):
    r = _run("generate", "--model", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_generate_reads_a_plan_file(tiny_models, tmp_path):
    plan = {"version": 1, "model": "tiny", "parallel": {"attn_groups": 2, "attn_tp": 1, "expert_groups": 2,
                                                        "expert_tp": 1, "micro_batches": 2, "layout": "afd"},
            "scheduler": {"max_num_seqs": 8}, "hardware": {}, "predicted": {}}
    path = tmp_path / "plan.json"
    path.write_text(__import__("json").dumps(plan))
    args = ("generate", "--model", tiny_models["mixtral"], "--prompt", "Hello", "--max-tokens", "6")
    single = _run(*args)
    planned = _run(*args, "--plan", str(path))
    assert single.returncode == 0 and planned.returncode == 0, planned.stderr
    assert planned.stdout == single.stdout
    assert "afd: 2 attention group(s) x tp 1, 2 expert group(s) x tp 1, 2 micro-batch(es)" in planned.stderr
    bad = _run(*args, "--plan", str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and "cannot use plan file" in bad.stderr


def test_colocated_layout_from_the_cli(tiny_models, capsys):
    from afdserve.__main__ import main

    assert main(["generate", "--model", tiny_models["qwen3_moe"], "--prompt", "Hi", "--max-tokens", "3",
                 "--layout", "colocated", "--data-parallel-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "colocated: 2 process(es)" in err


def test_serve_refuses_the_benchmark_skip_prefill_flag(capsys):
    from afdserve.__main__ import main

    assert main(["serve", "--benchmark-skip-prefill", "--port", "0"]) == 2
    assert "benchmark" in capsys.readouterr().err


def test_vllm_parallel_spellings():
    import argparse

    from afdserve.__main__ import _flag_kwargs, add_engine_args
    from afdserve.config import ConfigError

    p = argparse.ArgumentParser()
    add_engine_args(p)
    kw = _flag_kwargs(p.parse_args(["--data-parallel-size", "2", "--enable-expert-parallel"]))
    assert (kw["attn_groups"], kw["layout"]) == (2, "colocated")
    assert _flag_kwargs(p.parse_args(["--dist-timeout", "30"]))["dist_timeout_s"] == 30.0
    kw = _flag_kwargs(p.parse_args(["-tp", "2", "--expert-groups", "2"]))
    assert (kw["attn_tp"], kw["expert_tp"], kw["layout"]) == (2, 2, None)
    assert _flag_kwargs(p.parse_args([]))["afd_transport"] == "auto"
    assert _flag_kwargs(p.parse_args(["--afd-transport", "ipc"]))["afd_transport"] == "ipc"
    with pytest.raises(SystemExit):
        p.parse_args(["--afd-transport", "rdma"])
    for bad in (["-tp", "2", "--attn-tp", "2"], ["--enable-expert-parallel", "--layout", "afd"]):
        with pytest.raises(ConfigError):
            _flag_kwargs(p.parse_args(bad))
