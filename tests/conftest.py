"""Shared fixtures: tiny random checkpoints of every family, built once per test session."""

from __future__ import annotations

import os

import pytest

# the CPU suite stays on the CPU on a GPU machine too (its subprocesses inherit this): device
# "auto" would otherwise take the GPU; GPU tests ask for device="cuda" by name
os.environ.setdefault("AFDSERVE_DEVICE", "cpu")

from afdserve.tiny import FAMILIES, make_tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    # qwen2_moe is written as two shards to cover the sharded layout
    return {f: make_tiny(f, str(root / f), seed=1, shards=2 if f == "qwen2_moe" else 1) for f in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
