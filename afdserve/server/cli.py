"""``afdserve serve MODEL`` (the API server and its workers) and ``afdserve bench serve``.

``serve`` binds the port first (fail fast), loads the model (progress bar), then runs uvicorn.
SIGTERM/SIGINT drain: new generations get 503, running ones finish up to ``--shutdown-timeout``,
the rest are aborted, the workers are shut down and the process exits 0 (1 if the engine died)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys

import uvicorn

from afdserve.config import ConfigError, EngineConfig

logger = logging.getLogger("afdserve.server")


def register(sub) -> None:
    from afdserve.__main__ import add_engine_args
    from afdserve.server.bench import add_bench_args, cmd_bench_serve

    s = sub.add_parser("serve", help="OpenAI-compatible API server over the (disaggregated) engine")
    s.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model directory or Hub id (default: built-in tiny)")
    s.add_argument("--model", dest="model_flag", default=None, help="the model, as a flag (vLLM accepts both)")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("AFDSERVE_API_KEY") or os.environ.get("VLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $AFDSERVE_API_KEY, else $VLLM_API_KEY)")
    s.add_argument("--allowed-origins", type=json.loads, default=["*"], help="CORS origins, a JSON list")
    s.add_argument("--allowed-methods", type=json.loads, default=["*"], help="CORS methods, a JSON list")
    s.add_argument("--allowed-headers", type=json.loads, default=["*"], help="CORS headers, a JSON list")
    s.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    s.add_argument("--uvicorn-log-level", default=None, choices=["debug", "info", "warning", "error", "critical",
                                                                  "trace"],
                   help="uvicorn's own log level (default: --log-level)")
    s.add_argument("--kv-cache-dtype", default="auto", choices=["auto"],
                   help="the KV cache keeps the model dtype (fp8 caches are not supported)")
    for flag, what in [("--trust-remote-code", "afdserve runs no code from checkpoints"),
                       ("--disable-log-requests", "requests are not logged"),
                       ("--enable-log-requests", "requests are not logged"),
                       ("--disable-log-stats", "stats are at /metrics, never logged")]:
        s.add_argument(flag, action="store_true", help=f"accepted for vLLM's command lines; {what}")
    s.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="names the API accepts (the first is reported; default: the model path)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM")
    s.add_argument("--generation-config", default="auto",
                   help="auto: sampling defaults from the model's generation_config.json; vllm: ignore it; "
                        "a folder: its generation_config.json")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--metrics-prefix", default="afdserve",
                   help="namespace of the /metrics names (vllm: vLLM's names, for its dashboards and routers)")
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks against a running server")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bs = bsub.add_parser("serve", help="online serving benchmark (the shape of `vllm bench serve`)")
    add_bench_args(bs)
    bs.set_defaults(func=cmd_bench_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from afdserve.__main__ import default_model_dir, describe_deployment, engine_kwargs
    from afdserve.llm import make_config
    from afdserve.server.api import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.model and args.model_flag and args.model != args.model_flag:
        raise ConfigError(f"two models given: {args.model!r} and --model {args.model_flag!r}")
    model = args.model or args.model_flag or default_model_dir()
    if args.benchmark_skip_prefill:
        raise ConfigError("--benchmark-skip-prefill makes every completion meaningless; it is for decode benchmarks "
                          "(LLM/generate), not for serving clients")
    sock = bind(args.host, args.port)
    cfg = make_config(model, **engine_kwargs(args))
    print(f"serving {cfg.model}: {describe_deployment(cfg.parallel)} on {cfg.device} ({cfg.dtype})", file=sys.stderr,
          flush=True)
    template = load_chat_template(args.chat_template)
    engine = start_engine(cfg)
    try:
        state = make_state(engine, cfg, args, template)
        cors = dict(allow_origins=args.allowed_origins, allow_methods=args.allowed_methods,
                    allow_headers=args.allowed_headers, allow_credentials=args.allow_credentials)
        config = uvicorn.Config(build_app(state, cors), host=args.host, port=args.port,
                                log_level=args.uvicorn_log_level or args.log_level,
                                timeout_graceful_shutdown=2, lifespan="on")
        DrainingServer(config, state, args.shutdown_timeout).run(sockets=[sock])
    finally:
        if hasattr(engine, "shutdown"):
            engine.shutdown()
        sock.close()
    return state.exit_code


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, before any weight is loaded: a busy port fails in a second."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def start_engine(cfg: EngineConfig):
    if cfg.parallel.multi_process:
        from afdserve.frontend import AFDFrontend

        p = cfg.parallel
        print(f"starting workers: {p.attn_groups} attention group(s) x tp {p.attn_tp}, {p.expert_groups} expert "
              f"group(s) x tp {p.expert_tp}, m={p.micro_batches}", file=sys.stderr, flush=True)
        return AFDFrontend.spawn(cfg, show_progress=True)
    from afdserve.build import build_local_engine

    return build_local_engine(cfg, show_progress=True)


def make_state(engine, cfg: EngineConfig, args: argparse.Namespace, chat_template: str | None):
    from afdserve.server.api import ServerState
    from afdserve.server.async_engine import AsyncEngine
    from afdserve.server.metrics import ServerMetrics
    from afdserve.tokenizer import load_tokenizer

    names = args.served_model_name or [args.model or args.model_flag or cfg.model]  # a Hub id as typed
    metrics = ServerMetrics(names[0], args.metrics_prefix)
    aengine = AsyncEngine(engine, metrics)
    metrics.watch(lambda: aengine.stats)
    return ServerState(engine=aengine, tokenizer=load_tokenizer(cfg.model), model_names=names,
                       model_path=cfg.model, max_model_len=engine.max_model_len,
                       vocab_size=cfg.model_config.vocab_size, metrics=metrics, api_key=args.api_key or None,
                       chat_template=chat_template, defaults=generation_defaults(cfg.model, args.generation_config))


def load_chat_template(arg: str | None) -> str | None:
    """A template given inline (it has Jinja tags) or as a file."""
    if arg is None or "{{" in arg or "{%" in arg:
        return arg
    if not os.path.isfile(arg):
        raise ConfigError(f"--chat-template: no such file {arg!r} (and no Jinja tags to read it as a template)")
    with open(arg) as f:
        return f.read()


def generation_defaults(model_dir: str, mode: str) -> dict:
    """vLLM's rule: generation_config.json's sampling values replace the defaults of fields a
    request leaves out (``--generation-config vllm`` turns this off)."""
    if mode not in ("auto", "vllm") and not os.path.isfile(os.path.join(mode, "generation_config.json")):
        raise ConfigError(f"--generation-config: expected auto, vllm or a folder holding generation_config.json, "
                          f"got {mode!r}")
    path = os.path.join(model_dir if mode in ("auto", "vllm") else mode, "generation_config.json")
    if mode == "vllm" or not os.path.isfile(path):
        return {}
    with open(path) as f:
        gen = json.load(f)
    keys = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
    return {ours: gen[theirs] for theirs, ours in keys.items() if gen.get(theirs) is not None}


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT starting a drain instead of closing the socket at once (new
    requests must get a 503, not a refused connection). A second signal exits immediately."""

    def __init__(self, config, state, shutdown_timeout_s: float):
        super().__init__(config)
        self.state, self.shutdown_timeout_s = state, shutdown_timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None
        state.request_exit = self._exit
        state.engine.on_death = self._on_engine_death

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        original = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame) -> None:
        if self.state.draining:
            self.should_exit = self.force_exit = True
            return
        self.state.draining = True  # from now on new generations get 503
        logger.info("signal %d: draining (up to %.0f s), then exiting", sig, self.shutdown_timeout_s)
        from afdserve.server.api import drain

        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(drain(self.state, self.shutdown_timeout_s)))

    def _on_engine_death(self, reason: str) -> None:
        self.state.exit_code = 1
        self.loop.call_later(2.0, self._exit)  # in-flight requests get their error; /health says 503

    def _exit(self) -> None:
        self.should_exit = True
