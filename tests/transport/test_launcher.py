"""Launcher: clean runs return 0; a rank that raises, exits or is killed is named within
seconds, the others are stopped (SIGTERM, then SIGKILL), and no process is left."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from afdserve.launcher import Launcher, WorkerDied, free_port, launch, rank_from_env
from afdserve.transport.topology import Topology

TOPO = Topology(1, 1, 1, 1)  # rank 0: attention group 0; rank 1: expert group 0


def _gone(pids: list[int]) -> bool:
    """No process left: each pid is gone from /proc (reaped), or at worst a zombie."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return False
        except FileNotFoundError:
            continue
    return True


def _all_ready(out: Path, world_size: int) -> bool:
    return all((out / f"ready{r}").exists() for r in range(world_size))


def _worker(rank: int, world_size: int, init_method: str, out_dir: str, victim: int, action: str) -> None:
    """Every rank reports ready; the victim then acts once all are, the others sleep.
    Rank 0 ignores SIGTERM, so stopping it needs the SIGKILL after the grace period."""
    out = Path(out_dir)
    assert init_method.startswith("tcp://127.0.0.1:")
    if rank == 0 and action != "clean":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    (out / f"ready{rank}").write_text(str(os.getpid()))
    if action == "clean":
        if rank == 1:
            raise SystemExit(0)  # a clean exit too
        return
    while rank == victim and not _all_ready(out, world_size):
        time.sleep(0.02)
    if rank == victim:
        (out / "acted").write_text(repr(time.time()))
        if action == "raise":
            raise ValueError("boom from the victim")
        if action == "exit":
            os._exit(3)
    time.sleep(120)


def test_clean_run_returns_zero(tmp_path):
    assert launch(_worker, 2, (str(tmp_path), -1, "clean"), describe=TOPO.describe) == 0
    assert _all_ready(tmp_path, 2)
    pids = [int((tmp_path / f"ready{r}").read_text()) for r in range(2)]
    assert _gone(pids)


@pytest.mark.parametrize("victim,action,expected", [
    (1, "raise", "rank 1 (expert group 0, tp rank 0) exited with code 1 after raising ValueError: boom"),
    (1, "exit", "rank 1 (expert group 0, tp rank 0) exited with code 3"),
])
def test_failing_rank_is_named_and_others_stopped(tmp_path, victim, action, expected):
    launcher = Launcher(_worker, 2, (str(tmp_path), victim, action), describe=TOPO.describe, grace_s=1.0)
    launcher.start()
    with pytest.raises(WorkerDied) as err:
        launcher.wait(timeout_s=60)
    reported = time.time()
    assert str(err.value).startswith(expected) and err.value.rank == victim
    assert reported - float((tmp_path / "acted").read_text()) < 10
    assert launcher.exitcodes[0] == -signal.SIGKILL  # ignored SIGTERM: killed after the grace period
    launcher.shutdown()
    assert _gone(launcher.pids)


def test_killed_rank_is_reported_within_seconds(tmp_path):
    launcher = Launcher(_worker, 2, (str(tmp_path), -1, "sleep"), describe=TOPO.describe, grace_s=1.0)
    launcher.start()
    deadline = time.monotonic() + 60
    while not _all_ready(tmp_path, 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert launcher.poll() is None
    killed_at = time.monotonic()
    os.kill(launcher.pids[1], signal.SIGKILL)
    while launcher.poll() is None and time.monotonic() - killed_at < 10:
        time.sleep(0.05)
    assert launcher.poll().startswith("rank 1 (expert group 0, tp rank 0) was killed by signal SIGKILL")
    with pytest.raises(WorkerDied):
        launcher.wait(timeout_s=10)
    assert time.monotonic() - killed_at < 10
    launcher.shutdown()
    assert _gone(launcher.pids)


def test_shutdown_stops_running_ranks_without_reporting_failure(tmp_path):
    launcher = Launcher(_worker, 2, (str(tmp_path), -1, "sleep"), grace_s=1.0)
    launcher.start()
    deadline = time.monotonic() + 60
    while not _all_ready(tmp_path, 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    launcher.shutdown()
    assert time.monotonic() - start < 5
    assert launcher.poll() is None and launcher.exitcodes == [-signal.SIGKILL, -signal.SIGTERM]
    assert _gone(launcher.pids)
    launcher.shutdown()  # twice is fine


def test_rank_from_env(monkeypatch):
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    assert rank_from_env() == (3, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(RuntimeError, match="outside WORLD_SIZE=4"):
        rank_from_env()
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        rank_from_env()


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_unpicklable_args_fail_at_start():
    launcher = Launcher(_worker, 2, (lambda: None, -1, "clean"))
    with pytest.raises(Exception, match="pickle"):
        launcher.start()
    assert launcher.pids == []
