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


def test_nodes_started_with_other_flags_fail_naming_them(tiny_models, tmp_path):
    """Each torchrun node parses its own flags: a rank started with another --max-num-seqs stops
    every rank at start-up with an error naming the option, before any weight is loaded."""
    model = tiny_models["qwen3_moe"]
    master, frontend = _free_port(), _free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
              "--master-port", str(master), "-m", "afdserve.worker", "--model", model,
              "--expert-groups", "1", "--frontend-port", str(frontend)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    logs = [open(tmp_path / f"node{i}.log", "w") for i in range(2)]
    nodes = [subprocess.Popen(torchrun + ["--node-rank", "0"] + common, env=env, stdout=logs[0], stderr=logs[0]),
             subprocess.Popen(torchrun + ["--node-rank", "1"] + common + ["--max-num-seqs", "7"], env=env,
                              stdout=logs[1], stderr=logs[1])]
    try:
        codes = [p.wait(timeout=180) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    text = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert codes[0] != 0 and codes[1] != 0
    assert "rank 1 was started with other options than rank 0" in text and "scheduler.max_num_seqs" in text
