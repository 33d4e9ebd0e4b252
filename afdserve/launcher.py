"""Start every rank of a deployment and watch them (fail-stop: one dead rank stops them all).

One machine: ``Launcher(fn, world_size, args)`` spawns ``world_size`` processes running
``fn(rank, world_size, init_method, *args)`` (a top-level function, as the spawn start method
needs), watches them from a thread, and when one dies or exits non-zero it records which rank
(and its role, via ``describe``) and stops the others: SIGTERM, then SIGKILL after
``grace_s``. ``poll()``/``wait()`` report it; ``shutdown()`` stops everything; nothing is left
behind (children also die with the parent, via PR_SET_PDEATHSIG on Linux).

Several machines: each node starts its ranks with torchrun, which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT (env:// rendezvous); the entry calls
``rank_from_env()`` and passes ``"env://"`` as the init method. Node R of 2, P ranks each::

    torchrun --nnodes 2 --node-rank R --nproc-per-node P --master-addr A --master-port PORT \\
        -m afdserve.worker --model DIR --attn-groups ... --expert-groups ...

Global rank = R * P + local rank; ``Topology`` maps it to a role (attention groups first), so
node 0 holds the lowest ranks. torchrun then watches the ranks of its node.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait as wait_any

WorkerFn = Callable[..., object]  # fn(rank, world_size, init_method, *args)
_PR_SET_PDEATHSIG = 1


class WorkerDied(RuntimeError):
    """A rank died or exited non-zero; the message names the rank and its role."""

    def __init__(self, message: str, rank: int, exitcode: int):
        super().__init__(message)
        self.rank, self.exitcode = rank, exitcode


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS may hand it out again later: use it soon)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_from_env() -> tuple[int, int]:
    """(rank, world_size) of a process started by torchrun (env:// rendezvous)."""
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {', '.join(missing)} are not set: start this entry with "
                           "torchrun (see afdserve/launcher.py), or use Launcher on one machine")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return rank, world_size


class Launcher:
    """The ranks of one machine. ``describe(rank)`` names a rank in messages
    (``Topology.describe``); ``init_method`` defaults to ``tcp://127.0.0.1:<free port>``."""

    def __init__(self, fn: WorkerFn, world_size: int, args: Sequence = (), describe: Callable[[int], str] | None = None,
                 init_method: str | None = None, grace_s: float = 3.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.fn, self.world_size, self.args, self.grace_s = fn, world_size, tuple(args), grace_s
        self.describe = describe or (lambda rank: f"rank {rank}")
        self.init_method = init_method
        self._procs: list[mp.process.BaseProcess] = []
        self._errors: list = []  # read ends of the children's error pipes
        self._exitcodes: list[int | None] = [None] * world_size  # set by the monitor when it reaps
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._failure: WorkerDied | None = None
        self._stopping = False
        self._kill_at: float | None = None
        self._monitor: threading.Thread | None = None

    def start(self) -> None:
        """Spawn every rank and start watching them."""
        if self._procs:
            raise RuntimeError("the launcher was already started")
        ctx = mp.get_context("spawn")
        init = self.init_method or f"tcp://127.0.0.1:{free_port()}"
        die_with_parent = threading.current_thread() is threading.main_thread()
        try:
            for rank in range(self.world_size):
                read, write = ctx.Pipe(duplex=False)
                self._errors.append(read)
                proc = ctx.Process(target=_run_rank, name=f"afdserve-rank{rank}",
                                   args=(self.fn, rank, self.world_size, init, self.args, write, os.getpid(),
                                         die_with_parent))
                proc.start()  # pickles fn and args: fails here if they cannot be
                write.close()
                self._procs.append(proc)
        except BaseException:
            for proc in self._procs:  # leave nothing behind
                proc.kill()
                proc.join()
            raise
        atexit.register(self.shutdown)
        self._monitor = threading.Thread(target=self._watch, name="afdserve-launcher", daemon=True)
        self._monitor.start()

    @property
    def pids(self) -> list[int]:
        """Process id of every rank, in rank order."""
        return [p.pid for p in self._procs]

    @property
    def exitcodes(self) -> list[int | None]:
        """Exit code of every rank once reaped (negative: killed by that signal), else None."""
        return list(self._exitcodes)

    @property
    def failure(self) -> WorkerDied | None:
        return self._failure

    def poll(self) -> str | None:
        """None while no rank failed; else the message naming the first rank that died."""
        return None if self._failure is None else str(self._failure)

    def wait(self, timeout_s: float | None = None) -> int:
        """Block until every rank has exited: 0 when all exited cleanly, else raise ``WorkerDied``
        (the other ranks are stopped first). Raises TimeoutError after ``timeout_s``."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"ranks still running after {timeout_s} s")
        if self._failure is not None:
            raise self._failure
        return 0

    def shutdown(self, wait_s: float = 0.0) -> None:
        """Stop every rank: let them exit on their own for ``wait_s`` seconds, then SIGTERM, then
        SIGKILL after ``grace_s``; returns once every process is reaped."""
        if self._monitor is None:
            return
        self._done.wait(wait_s)
        with self._lock:
            if not self._stopping:
                self._begin_stop()
        self._monitor.join()
        for conn in self._errors:
            conn.close()
        atexit.unregister(self.shutdown)

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _watch(self) -> None:
        """Monitor thread: the only one that reaps the children."""
        alive = {p.sentinel: rank for rank, p in enumerate(self._procs)}
        while alive:
            ready = [alive.pop(s) for s in wait_any(list(alive), timeout=0.1)]
            for rank in ready:
                self._procs[rank].join()
                self._exitcodes[rank] = self._procs[rank].exitcode
            # killed by a signal before exited with an error: the victim, not a peer it took along
            for rank in sorted(ready, key=lambda r: (self._exitcodes[r] >= 0, r)):
                self._on_exit(rank)
            with self._lock:
                if self._kill_at is not None and time.monotonic() >= self._kill_at:
                    for rank in alive.values():
                        self._procs[rank].kill()
        self._done.set()

    def _on_exit(self, rank: int) -> None:
        code = self._exitcodes[rank]
        with self._lock:
            if code == 0 or self._stopping:
                return
            self._failure = WorkerDied(self._message(rank, code), rank, code)
            self._begin_stop()

    def _begin_stop(self) -> None:
        """SIGTERM every live rank; the monitor sends SIGKILL after the grace period."""
        self._stopping = True
        self._kill_at = time.monotonic() + self.grace_s
        for proc in self._procs:
            proc.terminate()  # no-op for a reaped child; never reaps (the monitor alone does)

    def _message(self, rank: int, code: int) -> str:
        how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        try:
            if self._errors[rank].poll(0):
                how += f" after raising {self._errors[rank].recv()}"
        except (EOFError, OSError):
            pass  # it died without a word
        others = self.world_size - 1
        return f"{self.describe(rank)} {how}; stopping the other {others} rank{'s' * (others != 1)}"


def _run_rank(fn: WorkerFn, rank: int, world_size: int, init_method: str, args: tuple, error_w,
              parent_pid: int, die_with_parent: bool) -> None:
    """Child entry: die with the parent, leave Ctrl-C to the parent, report an exception."""
    if die_with_parent and sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before we could ask to die with it
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fn(rank, world_size, init_method, *args)
    except SystemExit as e:
        if e.code not in (0, None):
            _exit_now(error_w, f"SystemExit: {e.code}", e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException as e:  # reported to the parent, then exit
        traceback.print_exc()
        _exit_now(error_w, f"{type(e).__name__}: {str(e)[:2000]}", 1)
    error_w.close()


def _exit_now(error_w, message: str, code: int) -> None:
    """Tell the parent why, then exit without interpreter teardown: destructors of process
    groups with ops still pending can hang or abort."""
    try:
        error_w.send(message)
    except OSError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(fn: WorkerFn, world_size: int, args: Sequence = (), describe: Callable[[int], str] | None = None,
           init_method: str | None = None, grace_s: float = 3.0) -> int:
    """Run ``fn`` on ``world_size`` ranks to completion: 0 when all exit cleanly, else raise
    ``WorkerDied`` naming the first rank that failed (the others are stopped)."""
    launcher = Launcher(fn, world_size, args, describe, init_method, grace_s)
    try:
        launcher.start()
        return launcher.wait()
    finally:
        launcher.shutdown()
