"""Fail-stop: a killed worker turns into errors for requests in flight, /health 503, a non-zero
exit and no orphan process."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

MODEL = "tiny-moe"


def _spawned_workers(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def test_killed_worker_fails_requests_and_the_server_exits(start_server):
    srv = start_server()
    workers = _spawned_workers(srv.workers)
    if not workers:
        pytest.skip("single-process layout: no worker to kill")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.api_key, max_retries=0, timeout=60)
    stream = client.completions.create(model=MODEL, prompt="doomed", max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    os.kill(workers[-1], signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(openai.APIError, match="engine"):
        for _ in stream:
            pass
    assert time.monotonic() - killed_at < 10
    health = httpx.get(srv.url + "/health", timeout=5)
    assert health.status_code == 503 and "rank" in health.json()["error"]["message"]
    assert srv.proc.wait(30) == 1
    deadline = time.monotonic() + 10
    while srv.alive_workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.alive_workers() == []
