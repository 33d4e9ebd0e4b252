"""The generation endpoints: request -> token ids -> engine children -> response or SSE stream.

A request becomes ``len(prompts) * n`` children (ids ``f"{rid}-{prompt}-{i}"``, seed + i as in
``LLM``). The choice index is ``prompt * n + i``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from afdserve.core import InvalidRequest, SamplingParams
from afdserve.server.async_engine import Child, RequestGroup
from afdserve.server.errors import APIError, as_api_error, sse_error
from afdserve.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SamplingFields,
)
from afdserve.server.render import (
    Choice,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs_entries,
    usage,
)

if TYPE_CHECKING:
    from afdserve.server.api import ServerState

MAX_CHOICES = 1024  # prompts x n in one request
Prompt = tuple[list[int], str | None]  # token ids, text


class SSEResponse(StreamingResponse):
    """A stream whose generator is always closed, so a client that leaves aborts its request."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def create_completion(state: ServerState, body: CompletionRequest, raw: Request) -> Response:
    model = state.check_model(body.model)
    body.check()
    prompts = [body.truncate(p, state.max_model_len) for p in completion_prompts(state.tokenizer, body.prompt)]
    max_tokens = resolve_max_tokens(state, prompts, body.max_tokens, "max_tokens", "prompt")
    params = to_params(body, max_tokens, body.logprobs, state.defaults, {}, body.wanted_prompt_logprobs)
    rid = f"cmpl-{uuid.uuid4().hex}"
    group = await add(state, make_children(rid, prompts, params), {})
    choices = [Choice(p * params.n + i, p, params.stop) for p in range(len(prompts)) for i in range(params.n)]
    text_of = TokenText(state.tokenizer)
    prefix = [(p[1] or state.tokenizer.decode(p[0])) if body.echo else "" for p in prompts]

    def logprobs(c: Choice, ids: list[int], lps, offset: int, with_prompt: bool):
        """The choice's logprobs; with an echo, the prompt's tokens first (the first one null)."""
        if body.logprobs is None:
            return None
        if with_prompt and body.echo:
            ids, lps = prompts[c.prompt_index][0] + ids, [None, *(c.prompt_logprobs or [])] + list(lps)
        return completion_logprobs(text_of, ids, lps, offset, body.logprobs)

    def prompt_lps(c: Choice, first: bool):
        if body.prompt_logprobs is None or not first:
            return None
        return prompt_logprobs_entries(text_of, prompts[c.prompt_index][0], c.prompt_logprobs or [],
                                       c.prompt_logprob_ranks or [], body.prompt_logprobs)

    def chunk(c: Choice, delta: str, new_ids: list[int], new_lps) -> CompletionChoice:
        first = len(c.token_ids) == len(new_ids)
        text = prefix[c.prompt_index] + delta if first else delta
        offset = 0 if first else len(prefix[c.prompt_index]) + len(c.text) - len(delta)
        return CompletionChoice(index=c.index, text=text, logprobs=logprobs(c, new_ids, new_lps, offset, first),
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                prompt_logprobs=prompt_lps(c, first))

    head = {"id": rid, "model": model}
    if body.stream:
        events = stream_events(group, choices, [len(p[0]) for p in prompts], body, chunk,
                               lambda cs, u: CompletionResponse(**head, choices=cs, usage=u))
        return SSEResponse(sse(events, group))
    await collect(raw, group, choices)
    out = [CompletionChoice(index=c.index, text=prefix[c.prompt_index] + c.final_text,
                            logprobs=logprobs(c, c.token_ids, c.logprobs, 0, True),
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                            prompt_logprobs=prompt_lps(c, True)) for c in choices]
    resp = CompletionResponse(**head, choices=out, usage=usage([len(p[0]) for p in prompts], choices))
    return JSONResponse(resp.model_dump())


async def create_chat(state: ServerState, body: ChatCompletionRequest, raw: Request) -> Response:
    model = state.check_model(body.model)
    body.check()
    kwargs = (body.chat_template_kwargs or {}) | ({"tools": body.tools} if body.tools else {})
    text = state.render_chat(body.messages, body.add_generation_prompt, body.continue_final_message, kwargs,
                             body.chat_template)
    prompts = [body.truncate((state.tokenizer.encode(text, add_special_tokens=False), text), state.max_model_len)]
    mt_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(state, prompts, body.requested_max_tokens, mt_field, "messages")
    top_n = body.top_logprobs or 0
    params = to_params(body, max_tokens, top_n if body.logprobs else None, state.defaults,
                       {"logprobs": "top_logprobs", "max_tokens": mt_field, "prompt": "messages"})
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    group = await add(state, make_children(rid, prompts, params), {"prompt": "messages"})
    choices = [Choice(i, 0, params.stop) for i in range(params.n)]
    text_of = TokenText(state.tokenizer)
    head = {"id": rid, "model": model}

    def logprobs(ids: list[int], lps) -> object:
        return chat_logprobs(text_of, ids, lps, top_n) if body.logprobs else None

    def chunk(c: Choice, delta: str, new_ids: list[int], new_lps) -> ChatStreamChoice:
        first = len(c.token_ids) == len(new_ids)
        msg = DeltaMessage(role="assistant", content=delta) if first else DeltaMessage(content=delta)
        return ChatStreamChoice(index=c.index, delta=msg, logprobs=logprobs(new_ids, new_lps),
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    if body.stream:
        events = stream_events(group, choices, [len(prompts[0][0])], body, chunk,
                               lambda cs, u: ChatCompletionChunk(**head, choices=cs, usage=u))
        return SSEResponse(sse(events, group))
    await collect(raw, group, choices)
    out = [ChatChoice(index=c.index, message=ChatMessage(content=c.final_text),
                      logprobs=logprobs(c.token_ids, c.logprobs), finish_reason=c.finish_reason,
                      stop_reason=c.stop_reason) for c in choices]
    resp = ChatCompletionResponse(**head, choices=out, usage=usage([len(prompts[0][0])], choices))
    return JSONResponse(resp.model_dump())


def completion_prompts(tokenizer, prompt) -> list[Prompt]:
    """One text, several texts, one token-id list, or several."""
    if isinstance(prompt, str):
        return [(tokenizer.encode(prompt), prompt)]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [(list(prompt), None)]
    return [(tokenizer.encode(p), p) if isinstance(p, str) else (list(p), None) for p in prompt]


def resolve_max_tokens(state: ServerState, prompts: list[Prompt], requested: int | None, field: str,
                       prompt_field: str) -> int | None:
    """The context-length check (vLLM's message: the limit and the requested count)."""
    limit = state.max_model_len
    for ids, _ in prompts:
        if len(ids) >= limit:
            raise InvalidRequest(f"This model's maximum context length is {limit} tokens. However, your prompt "
                                 f"has {len(ids)} tokens, leaving no room for the completion. Please reduce the "
                                 f"length of the prompt.", prompt_field)
        if requested is not None and len(ids) + requested > limit:
            raise InvalidRequest(f"This model's maximum context length is {limit} tokens. However, you requested "
                                 f"{len(ids) + requested} tokens ({len(ids)} in the prompt, {requested} in the "
                                 f"completion). Please reduce the length of the prompt or completion.", field)
    if requested is None and "max_tokens" in state.defaults:
        return min(state.defaults["max_tokens"], limit - max(len(ids) for ids, _ in prompts))
    return requested


def to_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None, defaults: dict,
              renames: dict[str, str], prompt_logprobs: int | None = None) -> SamplingParams:
    """SamplingParams, with an error's field named as this endpoint spells it."""
    try:
        return body.sampling_params(max_tokens, logprobs, defaults, prompt_logprobs)
    except InvalidRequest as e:
        raise _renamed(e, renames) from None


async def add(state: ServerState, children: list[Child], renames: dict[str, str]) -> RequestGroup:
    try:
        return await state.engine.add(children)
    except InvalidRequest as e:
        raise _renamed(e, renames) from None


def _renamed(e: InvalidRequest, renames: dict[str, str]) -> InvalidRequest:
    """The same error under this endpoint's field name ("logprobs must be ..." -> "top_logprobs ...")."""
    name, msg = renames.get(e.param, e.param), str(e)
    if e.param and msg.startswith(e.param):
        msg = str(name) + msg[len(e.param):]
    return InvalidRequest(msg, name)


def make_children(rid: str, prompts: list[Prompt], params: SamplingParams) -> list[Child]:
    if len(prompts) * params.n > MAX_CHOICES:
        raise InvalidRequest(f"{len(prompts)} prompts x n={params.n} exceeds {MAX_CHOICES} choices",
                             "n" if params.n > 1 else "prompt")
    children = []
    for p, (ids, text) in enumerate(prompts):
        for i in range(params.n):
            child = replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            children.append(Child(f"{rid}-{p}-{i}", ids, child, text))
    return children


async def collect(raw: Request, group: RequestGroup, choices: list[Choice]) -> None:
    """Wait for every choice; abort if the client disconnects first."""
    async def consume() -> None:
        async for upd in group.updates():
            choices[upd.index].advance(upd)

    work, gone = asyncio.ensure_future(consume()), asyncio.ensure_future(_disconnected(raw))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise APIError(499, "client disconnected")
        work.result()
    finally:
        for task in (work, gone):
            task.cancel()
        group.abort()


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


async def stream_events(group: RequestGroup, choices: list[Choice], prompt_lens: list[int],
                        body: SamplingFields, chunk: Callable, envelope: Callable) -> AsyncIterator[str]:
    """SSE ``data:`` events: one chunk per choice with news, then the usage chunk if asked."""
    continuous = bool(body.include_usage and body.stream_options.continuous_usage_stats)
    want_logprobs = body.logprobs is not None and body.logprobs is not False  # 0 asks for logprobs too
    async for upd in group.updates():
        c = choices[upd.index]
        delta = c.advance(upd)
        if not (delta or c.finish_reason or (want_logprobs and upd.token_ids)
                or len(c.token_ids) == len(upd.token_ids) > 0):
            continue
        u = usage(prompt_lens, choices) if continuous else None
        event = envelope([chunk(c, delta, upd.token_ids, upd.logprobs)], u)
        yield f"data: {event.model_dump_json()}\n\n"
    if body.include_usage:
        yield f"data: {envelope([], usage(prompt_lens, choices)).model_dump_json()}\n\n"


async def sse(events: AsyncIterator[str], group: RequestGroup) -> AsyncIterator[str]:
    """The stream as sent: events, an error event if something failed, then ``[DONE]``."""
    try:
        async for event in events:
            yield event
    except Exception as e:  # noqa: BLE001 -- reported to the client as an SSE error event
        err = as_api_error(e)
        yield sse_error(err.status, err.message, err.param)
    finally:
        group.abort()
    yield "data: [DONE]\n\n"
