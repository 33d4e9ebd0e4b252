"""Bad requests get OpenAI-shaped errors naming the field, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "tiny-moe"
VOCAB = 384  # the tiny model's vocabulary (afdserve.tiny)
MAX_LEN = 512  # its max_position_embeddings


def _post(server, path: str, body, key: bool = True, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    return err


COMPLETION_CASES = [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1.5}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logprobs": 21}, "logprobs"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"seed": 2**64}, "seed"),
    ({"stop": ""}, "stop"),
    ({"stop": 5}, "stop"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {str(VOCAB): 1.0}}, "logit_bias"),
    ({"logit_bias": {"-1": 1.0}}, "logit_bias"),
    ({"logit_bias": {"five": 1.0}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": [-1, 5]}, "prompt"),
    ({"prompt": [5, VOCAB]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 17}, "prompt"),
    ({"stop_token_ids": [VOCAB + 5]}, "stop_token_ids"),
    ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ({"guided_choice": ["yes", "no"]}, "guided_choice"),  # vLLM extras afdserve does not implement
    ({"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"bad_words": ["x"]}, "bad_words"),
    ({"allowed_token_ids": [3, VOCAB]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"prompt": [[5]] * 1025}, "prompt"),
    ({"prompt_embeds": "AAAA"}, "prompt_embeds"),
    ({"logits_processors": ["x"]}, "logits_processors"),
    ({"prompt_logprobs": -1, "echo": True, "logprobs": 1}, "prompt_logprobs"),
    ({"prompt_logprobs": 1.5}, "prompt_logprobs"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields,param", COMPLETION_CASES, ids=[f"{p}{i}" for i, (_, p) in enumerate(COMPLETION_CASES)])
def test_completion_bad_field_is_400_naming_it(server, fields, param, stream):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": stream} | fields
    if param == "stream_options":
        body["stream"] = False
    assert _error(_post(server, "/v1/completions", body), 400)["param"] == param


CHAT_CASES = [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"max_completion_tokens": MAX_LEN}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"chat_template_kwargs": {"tokenize": True}}, "messages"),
    ({"echo": True}, "echo"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"functions": [{"name": "f"}]}, "functions"),
]


@pytest.mark.parametrize("fields,param", CHAT_CASES, ids=[p + str(i) for i, (_, p) in enumerate(CHAT_CASES)])
def test_chat_bad_field_is_400_naming_it(server, fields, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | fields
    assert _error(_post(server, "/v1/chat/completions", body), 400)["param"] == param


def test_context_length_messages_state_limit_and_count(server):
    long_prompt = list(range(1, 501))
    err = _error(_post(server, "/v1/completions", {"model": MODEL, "prompt": long_prompt, "max_tokens": 20}), 400)
    assert err["param"] == "max_tokens"
    assert f"maximum context length is {MAX_LEN} tokens" in err["message"] and "520 tokens" in err["message"]
    err = _error(_post(server, "/v1/completions", {"model": MODEL, "prompt": [5] * MAX_LEN}), 400)
    assert err["param"] == "prompt" and f"{MAX_LEN} tokens" in err["message"]


def test_nan_and_malformed_json_are_4xx(server):
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    for raw in ['{"model": "tiny-moe", "prompt": "hi",', '{"prompt": "hi", "temperature": NaN}', "[1, 2]", "", "\xff"]:
        r = httpx.post(server.url + "/v1/completions", content=raw.encode("latin-1"), headers=headers, timeout=30)
        _error(r, 400)


def test_unknown_model_is_404(server):
    err = _error(_post(server, "/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404)
    assert err["param"] == "model" and err["message"] == "The model `gpt-9` does not exist."
    _error(_post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
           404)


def test_api_key_is_required_on_v1(server):
    _error(_post(server, "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=False), 401)
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    _error(r, 401)
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_route_and_method_keep_the_shape(server):
    _error(httpx.get(server.url + "/v2/nothing"), 404)
    _error(httpx.get(server.url + "/v1/completions", headers={"Authorization": f"Bearer {server.api_key}"}), 405)


def test_openai_client_sees_param_and_next_request_succeeds(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert e.value.param == "temperature" and e.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0).models.list()
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=5, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("fields", [
    {"repetition_penalty": 1e-38, "temperature": 1.0},  # overflows the seen tokens' logits to inf
    {"repetition_penalty": 1e-38, "temperature": 0.0},
    {"temperature": 1e-5, "logit_bias": {"5": 100, "6": 100}, "top_p": 0.01},
    {"temperature": 1e308, "min_p": 1.0},
])
def test_extreme_sampling_values_are_served(server, fields):
    """Legal but extreme sampling values get tokens (200) and the engine keeps serving: no
    engine failure, no 5xx."""
    body = {"model": MODEL, "prompt": "Hello hello hello", "max_tokens": 4, "ignore_eos": True}
    with httpx.Client(timeout=60) as c:
        headers = {"Authorization": f"Bearer {server.api_key}"}
        r = c.post(server.url + "/v1/completions", json=body | fields, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    assert _post(server, "/v1/completions", body).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
