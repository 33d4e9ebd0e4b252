"""The command line as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys


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
