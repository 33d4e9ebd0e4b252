"""The FastAPI app: routes, the API-key and shutdown gate, and the drain on SIGTERM.

``build_app(state)`` takes a ``ServerState`` that already holds a running engine; the engine
thread starts with the app (lifespan) and stops with it. The engine itself belongs to the caller."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import afdserve
from afdserve.core import InvalidRequest
from afdserve.server.async_engine import AsyncEngine
from afdserve.server.errors import APIError, error_response, install_handlers
from afdserve.server.metrics import ServerMetrics
from afdserve.server.protocol import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from afdserve.server.serving import create_chat, create_completion

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class ServerState:
    """Everything the routes need; built once by ``serve`` (or a test) around a running engine."""

    engine: AsyncEngine
    tokenizer: object  # the server's own copy: the engine thread may use the engine's at any time
    model_names: list[str]
    model_path: str
    max_model_len: int
    vocab_size: int
    metrics: ServerMetrics
    api_key: str | None = None
    chat_template: str | None = None
    defaults: dict = field(default_factory=dict)  # generation_config.json sampling defaults
    draining: bool = False
    in_flight: int = 0
    exit_code: int = 0
    request_exit: Callable[[], None] = lambda: None

    def check_model(self, name: str | None) -> str:
        """The model name to answer with; 404 for a name this server does not serve."""
        if name is None or name == "":
            return self.model_names[0]
        if name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        return name

    def render_chat(self, messages: list[ChatMessageIn], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, kwargs: dict | None = None,
                    chat_template: str | None = None) -> str:
        """The prompt text: the request's template, else the server's, else the tokenizer's. A
        message's other fields (tool_calls, tool_call_id, ...) reach the template as given."""
        template = chat_template or self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise APIError(400, "this model has no chat template; start the server with --chat-template", "messages")
        msgs = [m.model_dump(exclude_none=True) | {"content": _text_content(m.content)} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(
                msgs, chat_template=template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **(kwargs or {}))
        except Exception as e:  # noqa: BLE001 -- a template error is the request's problem
            raise InvalidRequest(f"the chat template failed on these messages: {type(e).__name__}: {e}",
                                 "messages") from None


def _text_content(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    kinds = {part.get("type") for part in content}
    if kinds - {"text"}:
        raise InvalidRequest(f"content parts of type {sorted(map(str, kinds - {'text'}))} are not supported "
                             f"(text only)", "messages")
    return "\n".join(str(part.get("text", "")) for part in content)


class Gate:
    """ASGI middleware: API key on /v1, 503 while draining or dead, count of generations in flight."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, s = scope["path"], self.state
        if s.api_key and path.startswith("/v1") and not self._authorized(scope):
            return await error_response(401, "invalid or missing API key")(scope, receive, send)
        if path not in GENERATE_PATHS:
            return await self.app(scope, receive, send)
        if s.draining or s.engine.dead:
            why = "the server is shutting down" if s.draining else f"the engine is dead: {s.engine.dead}"
            return await error_response(503, why)(scope, receive, send)
        s.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            s.in_flight -= 1

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers", []))
        given = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.state.api_key}".encode())


async def drain(state: ServerState, timeout_s: float) -> None:
    """SIGTERM: refuse new generations (503), let running ones finish up to ``timeout_s``, abort
    the rest, then ask the server to exit."""
    state.draining = True
    deadline = time.monotonic() + timeout_s
    while state.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.in_flight:
        state.engine.abort_all()
        deadline = time.monotonic() + 2.0
        while state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    state.request_exit()


def build_app(state: ServerState, cors: dict | None = None) -> FastAPI:
    """``cors``: CORSMiddleware's options (vLLM's default: every origin, method and header)."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.engine.start(asyncio.get_running_loop())
        yield
        state.engine.stop()

    app = FastAPI(title="afdserve", version=afdserve.__version__, lifespan=lifespan)
    install_handlers(app)
    app.add_middleware(Gate, state=state)
    # outermost: a browser's preflight (OPTIONS, no API key) is answered before the Gate
    app.add_middleware(CORSMiddleware, **(cors or dict(allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])))
    _add_routes(app, state)
    _add_token_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(state, body, raw)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat(state, body, raw)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=n, root=state.model_path, max_model_len=state.max_model_len)
                               for n in state.model_names])

    @app.get("/health")
    async def health() -> Response:
        if state.engine.dead:
            return error_response(503, f"the engine is dead: {state.engine.dead}")
        if state.draining:
            return error_response(503, "the server is shutting down")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": afdserve.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_token_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequest("give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            text = state.render_chat(body.messages, body.add_generation_prompt)
            ids = state.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                             "token_strs": None})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        state.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < state.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is out of the vocabulary (0..{state.vocab_size - 1})", "tokens")
        return JSONResponse({"prompt": state.tokenizer.decode(body.tokens)})
