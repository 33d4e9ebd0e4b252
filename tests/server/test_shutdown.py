"""SIGTERM: running requests finish, new ones get 503, the process exits 0 and leaves no worker."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest

from afdserve.server.api import drain

MODEL = "tiny-moe"


def test_sigterm_drains_in_flight_requests_then_exits(start_server):
    srv = start_server("--shutdown-timeout", "120")
    headers = {"Authorization": f"Bearer {srv.api_key}"}
    max_tokens = 120

    async def stream(client: openai.AsyncOpenAI, started: asyncio.Event) -> tuple[int, str | None]:
        s = await client.completions.create(model=MODEL, prompt="drain me", max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage, reason = None, None
        async for chunk in s:
            started.set()
            usage = chunk.usage.completion_tokens if chunk.usage else usage
            reason = next((c.finish_reason for c in chunk.choices if c.finish_reason), reason)
        return usage, reason

    async def scenario():
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=srv.api_key, max_retries=0, timeout=120)
        started = [asyncio.Event() for _ in range(4)]
        tasks = [asyncio.create_task(stream(client, e)) for e in started]
        plain = asyncio.create_task(httpx.AsyncClient(timeout=120).post(
            srv.url + "/v1/completions", headers=headers,
            json={"model": MODEL, "prompt": "and me", "max_tokens": max_tokens, "ignore_eos": True}))
        await asyncio.wait_for(asyncio.gather(*[e.wait() for e in started]), 60)
        srv.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(timeout=30) as http:
            refused = await http.post(srv.url + "/v1/completions", headers=headers,
                                      json={"model": MODEL, "prompt": "too late", "max_tokens": 2})
            health = await http.get(srv.url + "/health")
        assert not all(t.done() for t in tasks), "the in-flight requests ended before the test could check 503"
        return refused, health, await asyncio.gather(*tasks), await plain

    refused, health, streamed, plain = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == 503
    assert health.status_code == 503
    assert streamed == [(max_tokens, "length")] * 4
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == max_tokens
    assert srv.proc.wait(60) == 0, srv.logs()
    deadline = time.monotonic() + 10
    while srv.alive_workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.alive_workers() == []


class _FakeEngine:
    def __init__(self):
        self.aborted = 0

    def abort_all(self) -> None:
        self.aborted += 1


class _FakeState:
    def __init__(self, in_flight: int):
        self.engine, self.in_flight, self.draining, self.exited = _FakeEngine(), in_flight, False, False

    def request_exit(self) -> None:
        self.exited = True


@pytest.mark.parametrize("finishes_in_s,aborted", [(0.2, 0), (None, 1)])
def test_drain_waits_then_aborts_at_the_deadline(finishes_in_s, aborted):
    state = _FakeState(in_flight=1)

    async def run() -> float:
        if finishes_in_s is not None:
            asyncio.get_running_loop().call_later(finishes_in_s, lambda: setattr(state, "in_flight", 0))
        t0 = time.monotonic()
        await drain(state, timeout_s=1.0)
        return time.monotonic() - t0

    took = asyncio.run(run())
    assert state.draining and state.exited and state.engine.aborted == aborted
    assert took < (0.6 if aborted == 0 else 3.5)
