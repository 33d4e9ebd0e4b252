"""The engine seen from asyncio: one engine thread drives the engine (neither ``Engine`` nor
``AFDFrontend`` is thread-safe); requests and aborts reach it through a queue, and each HTTP
request gets its updates on an asyncio queue.

The engine thread is the only one that touches the engine. Its loop: apply queued commands,
step, publish the new tokens of every request (one ``call_soon_threadsafe`` per step). A failure
of the engine (a dead worker) fails every request in flight and marks the engine dead."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from afdserve.core import Request, SamplingParams
from afdserve.engine import Engine
from afdserve.server.errors import EngineDeadError
from afdserve.server.metrics import ServerMetrics

logger = logging.getLogger("afdserve.server")

IDLE_WAIT_S = 0.05  # an idle engine thread wakes this often (frontend stats, worker health)
POLL_S = 0.05  # the longest a busy loop waits for worker output before it looks at the queue again


@dataclass
class Child:
    """One sequence of an HTTP request (a prompt, sampled once)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


@dataclass
class Update:
    """What a child got in one engine step. ``text`` is the whole output text so far."""

    index: int
    token_ids: list[int]
    logprobs: list[dict[int, float]]
    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: BaseException | None = None
    prompt_logprobs: list[dict[int, float]] | None = None  # with the first token, when asked for
    prompt_logprob_ranks: list[int] | None = None


class RequestGroup:
    """The children of one HTTP request and the queue their updates arrive on (event loop side)."""

    def __init__(self, engine: AsyncEngine, children: list[Child]):
        self.engine, self.children = engine, children
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.unfinished = set(range(len(children)))

    async def updates(self) -> AsyncIterator[Update]:
        """Updates until every child finished; raises the first error a child got."""
        while self.unfinished:
            upd = await self.queue.get()
            if upd.error is not None:
                self.abort()
                raise upd.error
            if upd.finish_reason is not None:
                self.unfinished.discard(upd.index)
            yield upd

    def abort(self) -> None:
        """Abort the children still running (client gone, or an error); safe to call twice."""
        for i in sorted(self.unfinished):
            self.engine.abort(self.children[i].request_id)
        self.unfinished.clear()


@dataclass
class _Live:
    group: RequestGroup
    index: int
    arrival: float
    sent: int = 0  # tokens already published
    last: float | None = None  # when the last token was published


@dataclass
class _Add:
    group: RequestGroup
    future: asyncio.Future
    children: list[Child] = field(default_factory=list)


class AsyncEngine:
    def __init__(self, engine, metrics: ServerMetrics | None = None):
        self.engine, self.metrics = engine, metrics
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.live: dict[str, _Live] = {}
        self.stats: dict = {"running": 0, "waiting": 0, "kv_usage": 0.0, "num_preemptions": 0}
        self.dead: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.on_death: Callable[[str], None] | None = None

    # ------------------------------------------------------------ event loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="afdserve-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Abort what runs and end the engine thread (the engine itself is shut down by its owner)."""
        if self.thread is not None and self.thread.is_alive():
            self.inbox.put(("stop",))
            self.thread.join(timeout_s)

    async def add(self, children: list[Child]) -> RequestGroup:
        """Queue every child, or none: raises InvalidRequest (400) or EngineDeadError (503)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead}")
        group = RequestGroup(self, children)
        fut = self.loop.create_future()
        self.inbox.put(("add", _Add(group, fut, children)))
        try:
            await fut
        except asyncio.CancelledError:
            group.abort()  # the client left while the children were being added
            raise
        return group

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def abort_all(self) -> None:
        """Finish every request in flight with finish_reason "abort" (shutdown deadline)."""
        self.inbox.put(("abort_all",))

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while self._drain(wait_s=0.0 if self.engine.has_unfinished() else IDLE_WAIT_S):
                updated = self._step()
                self.stats = self.engine.stats()
                self._publish(updated)
        except Exception as e:  # noqa: BLE001 -- any engine failure is fail-stop
            self._die(e)

    def _step(self) -> list[Request]:
        if isinstance(self.engine, Engine):
            return self.engine.step()  # synchronous; returns [] at once when idle
        timeout_s = POLL_S if self.engine.has_unfinished() else 0.0
        return self.engine.step(timeout_s=timeout_s)  # disaggregated: whatever the workers sent

    def _drain(self, wait_s: float) -> bool:
        """Apply queued commands (waiting up to ``wait_s`` for the first); False on "stop"."""
        try:
            cmd = self.inbox.get(timeout=wait_s) if wait_s > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd[0] == "stop":
                self._abort_all()
                return False
            self._apply(cmd)
            try:
                cmd = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            self._add(cmd[1])
        elif cmd[0] == "abort":
            live = self.live.pop(cmd[1], None)
            if live is not None:
                self.engine.abort_request(cmd[1])
                self._count_abort(live)
        elif cmd[0] == "abort_all":
            self._abort_all()

    def _add(self, add: _Add) -> None:
        now, added = time.monotonic(), []
        try:
            for i, c in enumerate(add.children):
                self.engine.add_request(c.request_id, c.prompt_token_ids, c.params, prompt=c.prompt,
                                        arrival_time=time.time())
                added.append(c.request_id)
                self.live[c.request_id] = _Live(add.group, i, now)
        except Exception as e:  # noqa: BLE001 -- InvalidRequest (400) or anything else (500)
            for rid in added:
                self.live.pop(rid, None)
                self.engine.abort_request(rid)
            self._resolve(add.future, e)
            return
        if self.metrics is not None:
            self.metrics.on_added(add.children)
        self._resolve(add.future, None)

    def _publish(self, updated: list[Request]) -> None:
        now, out = time.monotonic(), []
        errors = getattr(self.engine, "errors", {})  # the frontend's per-request worker errors
        for req in updated:
            live = self.live.get(req.request_id)
            if live is None:
                continue  # aborted meanwhile
            new = req.output_token_ids[live.sent:]
            lps = req.output_logprobs[live.sent:] if req.params.logprobs is not None else []
            err = errors.pop(req.request_id, None)
            if self.metrics is not None:  # a request failed by its worker is not counted as finished
                self.metrics.on_tokens(len(new), now - (live.last or live.arrival), live.last is None,
                                       None if err is not None else req.finish_reason, now - live.arrival,
                                       req.queue_s)
            first = live.last is None
            live.sent, live.last = len(req.output_token_ids), now
            asked = first and req.params.prompt_logprobs is not None
            out.append((live.group, Update(live.index, new, lps, req.output_text, req.finish_reason,
                                           req.stop_reason, err, req.prompt_logprobs if asked else None,
                                           req.prompt_logprob_ranks if asked else None)))
            if req.finished:
                self.live.pop(req.request_id)
        self._deliver(out)

    def _abort_all(self) -> None:
        out = []
        for rid, live in list(self.live.items()):
            self.engine.abort_request(rid)
            self._count_abort(live)
            out.append((live.group, Update(live.index, [], [], "", finish_reason="abort")))
        self.live.clear()
        self._deliver(out)

    def _count_abort(self, live: _Live) -> None:
        if self.metrics is not None:
            self.metrics.on_aborted(time.monotonic() - live.arrival)

    def _die(self, e: BaseException) -> None:
        """Fail every request in flight, then refuse new ones until stopped."""
        self.dead = f"{type(e).__name__}: {e}"
        logger.error("engine failed: %s", self.dead)
        err = EngineDeadError(f"the engine failed: {self.dead}")
        self._deliver([(live.group, Update(live.index, [], [], "", error=err)) for live in self.live.values()])
        self.live.clear()
        if self.on_death is not None:
            self.loop.call_soon_threadsafe(self.on_death, self.dead)
        while True:  # adds that raced with the failure get the error, not silence
            cmd = self.inbox.get()
            if cmd[0] == "stop":
                return
            if cmd[0] == "add":
                self._resolve(cmd[1].future, err)

    # ------------------------------------------------------------ thread -> loop
    def _deliver(self, out: list[tuple[RequestGroup, Update]]) -> None:
        if out:
            self.loop.call_soon_threadsafe(_put_all, out)

    def _resolve(self, fut: asyncio.Future, exc: BaseException | None) -> None:
        self.loop.call_soon_threadsafe(_set_future, fut, exc)


def _put_all(out: list[tuple[RequestGroup, Update]]) -> None:
    for group, upd in out:
        group.queue.put_nowait(upd)


def _set_future(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)

