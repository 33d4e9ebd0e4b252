"""Fail-stop: a dead worker is reported by rank within seconds and nothing is left behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from afdserve import LLM, SamplingParams
from afdserve.frontend import WorkerFailure

pytestmark = pytest.mark.slow


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    continue
        except FileNotFoundError:
            continue
        out.append(pid)
    return out


@pytest.mark.parametrize("victim", [3, 1], ids=["expert_rank", "attn_rank"])
def test_killed_worker_is_reported_and_all_exit(tiny_models, victim):
    llm = LLM(tiny_models["mixtral"], attn_groups=2, expert_groups=2, micro_batches=2)
    pids = llm.engine.launcher.pids
    errors: list[BaseException] = []

    def generate():
        try:
            llm.generate([[5, 6, 7]] * 4, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        except BaseException as e:  # noqa: BLE001 -- the test inspects it
            errors.append(e)

    t = threading.Thread(target=generate)
    t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    t.join(timeout=30)
    assert not t.is_alive(), "generate hung after a worker died"
    assert time.monotonic() - killed_at < 10
    assert errors and isinstance(errors[0], WorkerFailure)
    assert f"rank {victim}" in str(errors[0])
    llm.shutdown()
    deadline = time.monotonic() + 10
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(pids) == []


def test_clean_shutdown_leaves_no_process(tiny_models):
    llm = LLM(tiny_models["mixtral"], attn_groups=1, expert_groups=2, micro_batches=2)
    pids = llm.engine.launcher.pids
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    llm.shutdown()
    deadline = time.monotonic() + 10
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(pids) == []
