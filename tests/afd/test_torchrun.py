"""Two "nodes" on one machine: two torchrun commands on loopback give the same tokens."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest

from afdserve import LLM, SamplingParams

pytestmark = pytest.mark.slow


def _free_port() -> int:
    """A free port below the kernel's ephemeral range, so no listener bound to port 0 by a
    concurrently running test can take it between this check and torchrun's bind."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def test_two_node_torchrun_matches_single_process(tiny_models, tmp_path):
    model = tiny_models["qwen3_moe"]
    prompts = [[5, 6, 7, 8], [9] * 20, [11]]
    with LLM(model) as llm:
        ref = [o.outputs[0].token_ids for o in
               llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    master, frontend = _free_port(), _free_port()
    # 2 attention groups + 2 expert groups = 4 ranks, 2 per node
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(master), "-m", "afdserve.worker", "--model", model,
              "--attn-groups", "2", "--expert-groups", "2", "--micro-batches", "2",
              "--frontend-port", str(frontend), "--max-tokens", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    node0 = subprocess.Popen(torchrun + ["--node-rank", "0"] + common +
                             ["--prompts-file", str(tmp_path / "prompts.json"),
                              "--output-file", str(tmp_path / "out.json")], env=env)
    node1 = subprocess.Popen(torchrun + ["--node-rank", "1"] + common, env=env)
    try:
        assert node0.wait(timeout=240) == 0
        assert node1.wait(timeout=60) == 0
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                p.kill()
    got = [o["token_ids"] for o in json.loads((tmp_path / "out.json").read_text())]
    assert got == ref
