"""A real ``afdserve serve`` process on 127.0.0.1 for the server tests.

The topology is the disaggregated one of the issue (2 attention groups, 2 expert groups, m=2);
``AFDSERVE_SERVER_TEST_LAYOUT=single`` runs the same tests on the single-process engine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from afdserve.tiny import make_tiny

API_KEY = "test-key"
MODEL_NAME = "tiny-moe"
AFD_FLAGS = ["--attn-groups", "2", "--expert-groups", "2", "--micro-batches", "2", "--layout", "afd"]


def topology_flags() -> list[str]:
    return [] if os.environ.get("AFDSERVE_SERVER_TEST_LAYOUT") == "single" else AFD_FLAGS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc; zombies excluded)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
        except OSError:
            pass
    return out


class ServerProcess:
    """``python -m afdserve serve`` in its own session; logs go to a file (never a full pipe)."""

    def __init__(self, model: str, log_path: str, *extra: str):
        self.port, self.model_name, self.api_key = free_port(), MODEL_NAME, API_KEY
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "afdserve", "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", MODEL_NAME, "--api-key", API_KEY, "--log-level", "warning",
               *topology_flags(), *extra]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers: list[int] = []

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.workers = descendants(self.proc.pid)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"server not ready within {timeout_s} s:\n{self.logs()}")

    def alive_workers(self) -> list[int]:
        """The processes the server had started (workers) that still live."""
        return alive(self.workers)

    def logs(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def stop(self) -> int:
        """SIGTERM, then SIGKILL of the whole session if it does not exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in alive(self.workers):  # only if the server failed to take its workers down
            os.kill(pid, signal.SIGKILL)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server_model(tmp_path_factory) -> str:
    return make_tiny("qwen3_moe", str(tmp_path_factory.mktemp("server") / "tiny"), seed=3)


@pytest.fixture(scope="session")
def server(server_model, tmp_path_factory) -> ServerProcess:
    srv = ServerProcess(server_model, str(tmp_path_factory.mktemp("logs") / "server.log"))
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def start_server(server_model, tmp_path_factory):
    """Start another server (``*extra`` flags); every one started is stopped at the end."""
    started: list[ServerProcess] = []

    def start(*extra: str) -> ServerProcess:
        srv = ServerProcess(server_model, str(tmp_path_factory.mktemp("logs") / "server.log"), *extra)
        started.append(srv)
        srv.wait_ready()
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def read_metrics():
    return metrics


@pytest.fixture()
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def metrics(url: str) -> dict[str, float]:
    """Prometheus samples without labels' values: ``{"afdserve:num_requests_running": 0.0, ...}``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{", 1)[0].split(" ")[0], line.rsplit(" ", 1)[1]
            out[name] = out.get(name, 0.0) + float(value)
    return out
