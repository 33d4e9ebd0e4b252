"""Frontend of a disaggregated deployment: starts the workers, places each request on the
attention replica with the least outstanding KV work, and mirrors their progress.

It offers the same calls as the in-process ``Engine`` (add_request, abort_request,
has_unfinished, step), so ``LLM`` and the API server drive either one."""

from __future__ import annotations

import secrets
import threading
import time
from multiprocessing.connection import Connection, Listener, wait

import torch

from afdserve.config import ConfigError, EngineConfig
from afdserve.core import InvalidRequest, Request, RequestStatus, SamplingParams
from afdserve.engine import validate_request
from afdserve.expert.eplb import LoadWindow, initial_placement, placement_for_loads, placement_group_loads
from afdserve.launcher import Launcher
from afdserve.tokenizer import load_tokenizer
from afdserve.transport.groups import STARTUP_TIMEOUT_S
from afdserve.worker import WorkerSpec, worker_main


class WorkerFailure(RuntimeError):
    """A worker process died or failed; the message names the rank and its role."""


class AFDFrontend:
    """Use ``AFDFrontend.spawn(cfg)`` on one machine; ``attach`` to workers started by torchrun."""

    def __init__(self, cfg: EngineConfig, listener: Listener, launcher: Launcher | None,
                 start_timeout_s: float = STARTUP_TIMEOUT_S):
        self.cfg, self.listener, self.launcher = cfg, listener, launcher
        self.tokenizer = load_tokenizer(cfg.model, required=cfg.load_format != "dummy")
        self.max_model_len = cfg.max_model_len
        self.conns: dict[int, Connection] = {}
        self.info: dict[int, dict] = {}
        self.requests: dict[str, Request] = {}
        self.group_of: dict[str, int] = {}
        self.errors: dict[str, InvalidRequest] = {}
        self.replica_stats: dict[int, dict] = {}
        self._outstanding: dict[int, int] = {}  # group -> outstanding_tokens
        mc = cfg.model_config
        self.load_window = LoadWindow(mc.num_layers, mc.num_experts, cfg.eplb.eplb_window_size)
        self.placement = initial_placement(cfg)  # the one the workers run now
        self.placement_version, self.steps_since_check = 0, 0
        self._requested = None
        self.group_tokens_total = torch.zeros(cfg.parallel.expert_groups, dtype=torch.float64)
        self._accept_all(cfg.parallel.attn_groups, start_timeout_s)

    @classmethod
    def spawn(cls, cfg: EngineConfig, show_progress: bool = False) -> AFDFrontend:
        """Start every worker of ``cfg``'s topology on this machine and connect to them
        (rank 0 and the first expert rank show weight-loading progress bars)."""
        authkey = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        spec = WorkerSpec(cfg, listener.address, authkey, timeout_s=cfg.dist_timeout_s, show_progress=show_progress)
        launcher = Launcher(worker_main, spec.topology.world_size, args=(spec,), describe=spec.topology.describe)
        launcher.start()
        return cls(cfg, listener, launcher)

    @classmethod
    def attach(cls, cfg: EngineConfig, listener: Listener) -> AFDFrontend:
        """Wait for the attention leaders of workers started elsewhere (torchrun)."""
        return cls(cfg, listener, None)

    def _accept_all(self, n: int, timeout_s: float) -> None:
        """Wait for every attention leader to connect, failing fast if a worker dies."""
        accepted: list[Connection] = []
        thread = threading.Thread(target=lambda: [accepted.append(self.listener.accept()) for _ in range(n)],
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while thread.is_alive():
            self._check_workers()
            if time.monotonic() > deadline:
                self.shutdown()
                raise WorkerFailure(f"workers did not start within {timeout_s:.0f} s")
            thread.join(0.05)
        for conn in accepted:
            _, group, info = conn.recv()
            self.conns[group], self.info[group] = conn, info

    def _check_workers(self) -> None:
        if self.launcher is None:
            return
        failure = self.launcher.poll()
        if failure is not None:
            self.launcher.shutdown()
            raise WorkerFailure(failure)

    def outstanding_tokens(self, group: int) -> int:
        """KV work a replica still has: over its unfinished requests, the prompt plus the tokens
        still to generate (kept up to date as tokens arrive, so placing a request is O(groups))."""
        return self._outstanding.get(group, 0)

    def _settle(self, req: Request, group: int) -> None:
        """A request left its replica (finished, aborted, refused): drop what it still counted."""
        self._outstanding[group] -= req.max_total_tokens - len(req.output_token_ids)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, arrival_time: float = 0.0) -> Request:
        total = validate_request(prompt_token_ids, params, self.cfg.model_config.vocab_size, self.max_model_len)
        group = min(self.conns, key=lambda g: (self.outstanding_tokens(g), g))
        req = Request(request_id, list(prompt_token_ids), params, arrival_time=arrival_time,
                      max_total_tokens=total, prompt=prompt, status=RequestStatus.RUNNING)
        self.requests[request_id], self.group_of[request_id] = req, group
        self._outstanding[group] = self._outstanding.get(group, 0) + total
        self.conns[group].send(("add", request_id, req.prompt_token_ids, params, prompt))
        return req

    def abort_request(self, request_id: str) -> Request | None:
        req = self.requests.pop(request_id, None)
        group = self.group_of.pop(request_id, None)
        if req is not None and not req.finished:
            self._settle(req, group)
            self.conns[group].send(("abort", request_id))
            req.status, req.finish_reason = RequestStatus.FINISHED, "abort"
        return req

    def has_unfinished(self) -> bool:
        return any(not r.finished for r in self.requests.values())

    def step(self, timeout_s: float = 1.0) -> list[Request]:
        """Apply whatever the replicas reported within ``timeout_s``; raise if a worker died."""
        self._check_workers()
        updated = []
        for conn in wait(list(self.conns.values()), timeout_s):
            try:
                msg = conn.recv()
            except EOFError:
                self._check_workers()
                time.sleep(0.5)
                self._check_workers()
                raise WorkerFailure("an attention worker closed its connection") from None
            if msg[0] in ("out", "stats"):
                self._record_stats(self._group_of_conn(conn), msg[-1])
            updated += self._apply(msg)
        self._maybe_rebalance()
        return updated

    def _record_stats(self, group: int, stats: dict) -> None:
        load = stats.pop("expert_load", None)
        if load is not None:
            load = torch.from_numpy(load).double()
            self.load_window.add(load)
            self.steps_since_check += 1
            self.group_tokens_total += placement_group_loads(self.placement, load).sum(0)
        self.replica_stats[group] = self.replica_stats.get(group, {}) | stats

    def request_placement(self, placement) -> None:
        """Have the workers switch to ``placement`` between two steps (no request stops)."""
        if self.cfg.parallel.colocated:
            raise ConfigError("live expert re-placement is not supported with the colocated layout yet (its "
                              "processes would route to experts they have not loaded)")
        self.placement_version = placement.version
        self._requested = placement
        self.conns[0].send(("placement", placement))

    def _pending_placement(self, version: int):
        requested = self._requested
        if requested is None or requested.version != version:
            raise WorkerFailure(f"workers applied expert placement version {version}, which was not requested")
        return requested

    def rebalance(self, loads_LE=None) -> None:
        """Re-place experts for the window's loads (or ``loads_LE``)."""
        loads = self.load_window.loads() if loads_LE is None else loads_LE
        self.request_placement(placement_for_loads(self.cfg, loads, self.placement_version + 1))

    def _maybe_rebalance(self) -> None:
        """Periodic EPLB: every ``eplb_step_interval`` reports, re-place if unbalanced."""
        eplb = self.cfg.eplb
        if not eplb.enable_eplb or self.steps_since_check < eplb.eplb_step_interval:
            return
        self.steps_since_check = 0
        if self.placement_version == getattr(self.placement, "version", 0) and \
                self.load_window.balancedness(self.placement) < eplb.eplb_threshold:
            self.rebalance()

    def _group_of_conn(self, conn: Connection) -> int:
        return next(g for g, c in self.conns.items() if c is conn)

    def stats(self) -> dict:
        """Gauges summed over attention replicas (as last reported by each); host-timed
        (seconds, count) of dispatch issue, combine waits and per-step bubbles; tokens sent to
        each expert group since start; and over the load window, each group's load and the
        balancedness (mean/max group load, averaged over layers)."""
        per = list(self.replica_stats.values())
        total = {k: sum(s.get(k, 0) for s in per)
                 for k in ("running", "waiting", "num_preemptions", "prefix_cache_queries", "prefix_cache_hits")}
        total["kv_usage"] = sum(s["kv_usage"] for s in per) / max(1, len(self.conns))
        for key in ("dispatch_seconds", "combine_seconds", "bubble_seconds"):
            pairs = [s[key] for s in per if key in s]
            total[key] = (sum(p[0] for p in pairs), sum(p[1] for p in pairs))
        total["expert_group_tokens"] = [int(x) for x in self.group_tokens_total.round().tolist()]
        total["expert_group_load"] = placement_group_loads(self.placement, self.load_window.loads()).sum(0).tolist()
        total["expert_balancedness"] = self.load_window.balancedness(self.placement)
        total["placement_version"] = getattr(self.placement, "version", 0)
        return total

    def _apply(self, msg: tuple) -> list[Request]:
        if msg[0] == "stats":
            return []
        if msg[0] == "placement_applied":
            self.placement = self._pending_placement(msg[1])
            return []
        if msg[0] == "error":
            _, rid, text, param = msg
            req = self.requests.pop(rid, None)
            if req is not None:
                self._settle(req, self.group_of.pop(rid))
                req.status, req.finish_reason = RequestStatus.FINISHED, "abort"
                self.errors[rid] = InvalidRequest(text, param)
            return [req] if req is not None else []
        updated = []
        for rid, token, lp, kept, added, reason, stop_reason, queue_s, prompt_lps in msg[1]:
            req = self.requests.get(rid)
            if req is None:
                continue  # aborted meanwhile
            if prompt_lps is not None:
                req.prompt_logprobs, req.prompt_logprob_ranks = prompt_lps
            req.output_token_ids.append(token)
            self._outstanding[self.group_of[rid]] -= 1
            if lp is not None:
                req.output_logprobs.append(lp)
            req.output_text, req.stop_reason, req.queue_s = req.output_text[:kept] + added, stop_reason, queue_s
            if reason is not None:
                req.status, req.finish_reason = RequestStatus.FINISHED, reason
                self.requests.pop(rid)
                self._settle(req, self.group_of.pop(rid))
            updated.append(req)
        return updated

    def shutdown(self) -> None:
        for conn in self.conns.values():
            try:
                conn.send(("shutdown",))
            except OSError:
                pass
        if self.launcher is not None:
            self.launcher.shutdown(wait_s=10.0)  # workers leave their loop at the next step
        for conn in self.conns.values():
            conn.close()
        self.listener.close()

