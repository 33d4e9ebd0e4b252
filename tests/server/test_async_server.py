"""The API server on the single-process engine with ``--async-scheduling``: the offline
synchronous engine's text, streamed or not, with stop strings, n = 2 and concurrent clients."""

from __future__ import annotations

import concurrent.futures

import pytest

from afdserve import LLM, SamplingParams
from tests.server.conftest import API_KEY, ServerProcess
from tests.server.test_openai_api import MODEL, _stream_text


@pytest.fixture(scope="module")
def async_server(server_model, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("AFDSERVE_SERVER_TEST_LAYOUT", "single")
    srv = ServerProcess(server_model, str(tmp_path_factory.mktemp("logs") / "async.log"), "--async-scheduling")
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_async_server_matches_the_sync_engine(async_server, server_model):
    import openai

    prompts = ["Hello world! How are you today?", "Once upon a time", "1 2 3 4", "The capital of"]
    with LLM(server_model, async_scheduling=False) as llm:
        ref = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20,
                                                                                ignore_eos=True))]
    stop = next(ref[0][i:i + 2] for i in range(3, len(ref[0]) - 2) if ref[0][i:i + 2].isascii()
                and ref[0][i:i + 2].strip())
    kw = dict(model=MODEL, max_tokens=20, temperature=0.0, extra_body={"ignore_eos": True})
    with openai.OpenAI(base_url=async_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # concurrent requests share the steps
            got = list(pool.map(lambda p: client.completions.create(prompt=p, **kw).choices[0].text, prompts))
        assert got == ref
        texts, reasons, _ = _stream_text(client.completions.create(prompt=prompts[0], stream=True, n=2, **kw))
        assert texts == {0: ref[0], 1: ref[0]} and reasons == {0: "length", 1: "length"}
        cut = client.completions.create(prompt=prompts[0], stop=[stop], **kw).choices[0]
        assert (cut.text, cut.finish_reason) == (ref[0][: ref[0].index(stop)], "stop")
        texts, reasons, _ = _stream_text(client.completions.create(prompt=prompts[0], stop=[stop], stream=True, **kw))
        assert texts == {0: cut.text} and reasons == {0: "stop"}
