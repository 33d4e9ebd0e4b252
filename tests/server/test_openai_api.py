"""The official ``openai`` client against a real server: completions and chat, streamed and not."""

from __future__ import annotations

import httpx
import pytest

MODEL = "tiny-moe"  # --served-model-name in conftest.py
PROMPT = "Hello world! How are you today?"
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str], object]:
    """Concatenated text and the finish reason per choice index, and the usage chunk's usage."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for ch in chunk.choices:
            piece = ch.text if hasattr(ch, "text") else (ch.delta.content or "")
            texts[ch.index] = texts.get(ch.index, "") + piece
            if ch.finish_reason is not None:
                reasons[ch.index] = ch.finish_reason
    return texts, reasons, usage


def test_models_lists_served_name(client, server_model):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_streamed_equals_non_streamed(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **GREEDY)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    texts, reasons, usage = _stream_text(stream)
    assert texts == {0: full.choices[0].text} and reasons == {0: "length"}
    assert usage.model_dump() == full.usage.model_dump()


def test_chat_streamed_equals_non_streamed(client, server):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, **GREEDY)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    texts, reasons, usage = _stream_text(stream)
    assert texts == {0: full.choices[0].message.content} and reasons == {0: "length"}
    assert usage.model_dump() == full.usage.model_dump()
    tokens = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    assert full.usage.prompt_tokens == tokens["count"]  # the chat template was applied once


@pytest.mark.parametrize("stream", [False, True])
def test_n2_gives_two_indexed_choices(client, stream):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, n=2, seed=7, temperature=1.0,
              extra_body={"ignore_eos": True})
    if not stream:
        out = client.completions.create(**kw)
        assert sorted(c.index for c in out.choices) == [0, 1]
        assert out.usage.completion_tokens == 12
        return
    texts, reasons, usage = _stream_text(client.completions.create(stream=True, stream_options={
        "include_usage": True}, **kw))
    assert sorted(texts) == [0, 1] and reasons == {0: "length", 1: "length"}
    assert usage.completion_tokens == 12
    again = client.completions.create(**kw)  # same seed: the same samples, streamed or not
    assert {c.index: c.text for c in again.choices} == texts


def _ascii_stop(text: str) -> str:
    """A 2-character substring of plain letters to stop on, found after the first few characters."""
    for i in range(3, len(text) - 1):
        if text[i:i + 2].isascii() and text[i:i + 2].isalpha():
            return text[i:i + 2]
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_text(client, stream):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, **GREEDY).choices[0].text
    stop = _ascii_stop(full)
    expected = full[: full.index(stop)]
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=40, stop=[stop, "\x00never"], **GREEDY)
    if stream:
        texts, reasons, _ = _stream_text(client.completions.create(stream=True, **kw))
        assert texts == {0: expected} and reasons == {0: "stop"}
    else:
        choice = client.completions.create(**kw).choices[0]
        assert (choice.text, choice.finish_reason) == (expected, "stop")
        assert choice.model_extra["stop_reason"] == stop


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text or "\ufffd" in out.choices[0].text
    for token_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and token_lp <= 0
        assert token_lp == pytest.approx(max(top.values()))  # greedy: the sampled token is the top one


def test_chat_logprobs_streamed(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=6, logprobs=True, top_logprobs=3, stream=True, **GREEDY)
    entries = [e for chunk in stream for ch in chunk.choices if ch.logprobs for e in ch.logprobs.content]
    assert len(entries) == 6
    for e in entries:
        assert len(e.top_logprobs) == 3
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)


def test_token_id_prompts_and_batch(client, server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, **GREEDY)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon"], max_tokens=3, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == by_text.choices[0].text[:len(
        batch.choices[0].text)]
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == PROMPT


def test_health_version_metrics(server, read_metrics):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    m = read_metrics(server.url)
    for name in ("afdserve:num_requests_running", "afdserve:num_requests_waiting", "afdserve:kv_cache_usage_perc",
                 "afdserve:num_preemptions_total", "afdserve:prompt_tokens_total",
                 "afdserve:generation_tokens_total", "afdserve:time_to_first_token_seconds_count",
                 "afdserve:inter_token_latency_seconds_count", "afdserve:e2e_request_latency_seconds_count"):
        assert name in m, name
    headers = {"Authorization": f"Bearer {server.api_key}"}
    before = read_metrics(server.url)
    httpx.post(server.url + "/v1/completions", headers=headers, timeout=60,
               json={"model": MODEL, "prompt": "x", "max_tokens": 3, "ignore_eos": True})
    after = read_metrics(server.url)
    assert after["afdserve:generation_tokens_total"] == before["afdserve:generation_tokens_total"] + 3
    # queue time: one observation per request, measured where it waited (the attention worker)
    queued = "afdserve:request_queue_time_seconds_count"
    assert after[queued] == before.get(queued, 0) + 1 and after["afdserve:request_queue_time_seconds_sum"] >= 0
    # AFD metrics: tokens per expert group, the load balance, transfer and bubble timings
    for name in ("afdserve:expert_group_tokens_total", "afdserve:expert_group_load", "afdserve:expert_balancedness",
                 "afdserve:dispatch_latency_seconds_count", "afdserve:combine_latency_seconds_count",
                 "afdserve:micro_batch_bubble_seconds_count"):
        assert name in after, name
    assert after["afdserve:expert_group_tokens_total"] > 0 and 0 < after["afdserve:expert_balancedness"] <= 1


def test_echo_prepends_the_prompt(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, **GREEDY).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, **GREEDY)
    assert echoed.choices[0].text == PROMPT + plain
    texts, _, _ = _stream_text(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True,
                                                         stream=True, **GREEDY))
    assert texts == {0: PROMPT + plain}


def test_logit_bias_and_penalties_reach_the_sampler(client, server_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server_model)
    token = tok.encode(" the")[0]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logit_bias={str(token): 100},
                                    **GREEDY)
    assert out.choices[0].text == tok.decode([token] * 4)
    # the penalties are accepted and applied (their arithmetic: tests/test_sampler.py)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, frequency_penalty=2.0,
                                    presence_penalty=2.0, temperature=0.0,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


def test_vllm_extras_truncation_allowed_tokens_and_tools_none(client, server_model):
    """truncate_prompt_tokens keeps the prompt's last tokens (a prompt over the context then
    fits); allowed_token_ids limits every sampled token; tools with tool_choice "none" are
    accepted (nothing to parse)."""
    out = client.completions.create(model=MODEL, prompt=[7] * 600, max_tokens=3,
                                    extra_body={"truncate_prompt_tokens": 100, "ignore_eos": True})
    assert out.usage.prompt_tokens == 100 and out.usage.completion_tokens == 3
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=3,
                                    logprobs=0, extra_body={"allowed_token_ids": [11, 12], "ignore_eos": True})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server_model)
    assert out.usage.completion_tokens == 8
    assert set(out.choices[0].logprobs.tokens) <= {tok.decode([11]), tok.decode([12])}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                         tools=tools, tool_choice="none")
    assert out.choices[0].message.content is not None
    # a request's own chat template (vLLM's chat_template field) replaces the model's
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi there"}],
                                         max_tokens=1, extra_body={"chat_template": "{{ messages[0]['content'] }}"})
    assert out.usage.prompt_tokens == len(tok.encode("hi there", add_special_tokens=False))


def test_cors_preflight_needs_no_api_key(server):
    r = httpx.options(server.url + "/v1/chat/completions",
                      headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://example.com")


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt(client, server_model, stream):
    """lm-eval's log-likelihood request (echo + logprobs): the prompt's tokens come back with
    their logprobs (the first null), then the output's; they equal the offline engine's prompt
    logprobs. vLLM's prompt_logprobs field gives the same numbers in its own shape."""
    from afdserve import LLM, SamplingParams

    prompt = [5, 17, 99, 4, 250, 31]
    with LLM(server_model) as llm:
        want = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1))[0].prompt_logprobs
    kw = dict(model=MODEL, prompt=prompt, max_tokens=2, echo=True, logprobs=1, temperature=0.0,
              extra_body={"ignore_eos": True, "prompt_logprobs": 2})
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        lp, first = chunks[0].choices[0].logprobs, chunks[0].choices[0]
        token_lps = lp.token_logprobs + [x for c in chunks[1:] for ch in c.choices if ch.logprobs
                                         for x in ch.logprobs.token_logprobs]
    else:
        first = client.completions.create(**kw).choices[0]
        token_lps = first.logprobs.token_logprobs
    assert len(token_lps) == len(prompt) + 2 and token_lps[0] is None
    assert token_lps[1:len(prompt)] == pytest.approx([w[t] for w, t in zip(want[1:], prompt[1:])], abs=1e-4)
    plp = first.model_extra["prompt_logprobs"]
    assert len(plp) == len(prompt) and plp[0] is None
    for entry, t, w in zip(plp[1:], prompt[1:], want[1:]):
        assert entry[str(t)]["logprob"] == pytest.approx(w[t], abs=1e-4) and len(entry) in (2, 3)
        # ranks: 1 and 2 for the top two; the prompt token's own also when it is not among them
        ranks, own = sorted(e["rank"] for e in entry.values()), entry[str(t)]["rank"]
        assert ranks[:2] == [1, 2] and (len(entry) == 2 or own == ranks[2] > 2)


def test_chat_stream_deltas_carry_only_their_fields(server):
    """As OpenAI streams them: the role in the first delta, no "role": null afterwards."""
    import json

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {server.api_key}"}) as r:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines()
                  if line.startswith("data: {") and json.loads(line[6:])["choices"]]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:]) and len(deltas) > 1
