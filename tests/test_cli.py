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


def test_device_and_dtype_auto(tiny_models, monkeypatch):
    """vLLM's defaults: the GPU when there is one, the checkpoint's half-precision dtype there
    (float16 for a float32 checkpoint), float32 on the CPU; vLLM's dtype spellings."""
    import torch

    from afdserve.config import ConfigError, ModelConfig, make_config, resolve_device, resolve_dtype

    mc = ModelConfig.from_dir(tiny_models["qwen3_moe"])
    bf16 = ModelConfig(**{**mc.__dict__, "torch_dtype": "bfloat16"})
    assert resolve_dtype("auto", "cpu", bf16) == "float32"
    assert resolve_dtype("auto", "cuda", bf16) == "bfloat16"
    assert resolve_dtype("auto", "cuda:1", ModelConfig(**{**mc.__dict__, "torch_dtype": "float32"})) == "float16"
    assert (resolve_dtype("half", "cpu", mc), resolve_dtype("float", "cuda", mc)) == ("float16", "float32")
    with pytest.raises(ConfigError, match="fp8"):
        resolve_dtype("fp8", "cuda", mc)
    unset = dict(max_num_seqs=None, max_num_batched_tokens=None)  # what the CLI passes by default
    monkeypatch.delenv("AFDSERVE_DEVICE")  # tests/conftest.py pins it to cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"
    cfg = make_config(tiny_models["qwen3_moe"], **unset)
    assert (cfg.device, cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens) == ("cuda", 256, 2048)
    assert cfg.dtype == resolve_dtype("auto", "cuda", mc)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = make_config(tiny_models["qwen3_moe"], **unset)
    monkeypatch.setenv("AFDSERVE_DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cpu"
    assert (cfg.device, cfg.dtype, cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens) == \
        ("cpu", "float32", 64, 512)


def test_hub_ids_are_fetched_like_vllm(tiny_models, monkeypatch):
    """``org/name`` that is not a local folder comes from the Hugging Face Hub cache; a failed
    fetch is a clear error naming the id."""
    import huggingface_hub

    from afdserve.config import ConfigError, make_config

    asked = []

    def fake_download(repo_id, allow_patterns=None):
        asked.append((repo_id, allow_patterns))
        if repo_id != "org/tiny":
            raise OSError("repository not found")
        return tiny_models["qwen3_moe"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    cfg = make_config("org/tiny", load_format="dummy")
    assert cfg.model == tiny_models["qwen3_moe"] and "*.safetensors" not in asked[0][1]
    with pytest.raises(ConfigError, match="'org/missing'.*repository not found"):
        make_config("org/missing")
    assert "*.safetensors" in asked[1][1]


def test_kv_blocks_below_one_sequence_fail_at_start(tiny_models):
    from afdserve.config import ConfigError, make_config

    with pytest.raises(ConfigError, match="cannot hold one sequence of max_model_len=512"):
        make_config(tiny_models["qwen3_moe"], num_kv_blocks=12, block_size=16)
    assert make_config(tiny_models["qwen3_moe"], num_kv_blocks=12, max_model_len=192).cache.num_kv_blocks == 12


def test_serve_accepts_vllm_command_lines(tmp_path, monkeypatch):
    """Flags vLLM launch scripts carry parse (the model as --model too); $VLLM_API_KEY is the
    key when $AFDSERVE_API_KEY is not set."""
    pytest.importorskip("uvicorn")
    from afdserve.__main__ import build_parser

    monkeypatch.delenv("AFDSERVE_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    args = build_parser().parse_args([
        "serve", "--model", "m", "--trust-remote-code", "--disable-log-requests", "--disable-log-stats",
        "--uvicorn-log-level", "warning", "--kv-cache-dtype", "auto", "--allowed-origins", '["http://a"]',
        "--generation-config", str(tmp_path), "--dtype", "auto", "-tp", "1"])
    assert (args.model_flag, args.api_key, args.allowed_origins) == ("m", "from-vllm", ["http://a"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"])
    from afdserve.config import ConfigError
    from afdserve.server.cli import generation_defaults

    with pytest.raises(ConfigError, match="generation_config.json"):
        generation_defaults("unused", str(tmp_path))  # a folder without the file
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 0.9}')
    assert generation_defaults("unused", str(tmp_path)) == {"temperature": 0.6, "top_p": 0.9}
