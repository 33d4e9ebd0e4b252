"""Benchmarks only: the device time of each step's compute ops, per worker process.

With ``AFDSERVE_OP_TIMING=DIR`` in the environment, the pipeline executors time every
attention op and every expert op with CUDA events (wall clock on CPU) and each process writes
``DIR/rank<R>.jsonl`` when its worker exits: one line per global step,
``{"step", "tokens", "wall_s", "<kind>_s", "<kind>_ops"}``, where ``tokens`` are the step's
tokens on an attention rank and the rows received on an expert rank. Every rank takes part in
the same global steps in the same order, so line i of every file is the same step. Unset, the
executors skip all of it.
"""

from __future__ import annotations

import json
import os
import time

import torch

ENV = "AFDSERVE_OP_TIMING"


class OpTimer:
    def __init__(self, directory: str, device: torch.device | str):
        self.directory, self.device = directory, torch.device(device)
        self.records: list[dict] = []
        self._open: list[tuple[str, object, object]] = []
        self._t0 = None

    def begin_step(self) -> None:
        self._open, self._t0 = [], time.perf_counter()

    def start(self, kind: str):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return kind, ev
        return kind, time.perf_counter()

    def stop(self, token) -> None:
        kind, begin = token
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._open.append((kind, begin, end))
        else:
            self._open.append((kind, begin, time.perf_counter()))

    def lap(self, token, kind: str):
        """Stop ``token`` and start timing ``kind``."""
        self.stop(token)
        return self.start(kind)

    def end_step(self, tokens: int) -> None:
        """Close the step (waits for its last timed op on the GPU)."""
        rec: dict = {"step": len(self.records), "tokens": int(tokens)}
        for kind, begin, end in self._open:
            if self.device.type == "cuda":
                end.synchronize()
                seconds = begin.elapsed_time(end) / 1e3
            else:
                seconds = end - begin
            rec[f"{kind}_s"] = rec.get(f"{kind}_s", 0.0) + seconds
            rec[f"{kind}_ops"] = rec.get(f"{kind}_ops", 0) + 1
        rec["wall_s"] = time.perf_counter() - self._t0
        self.records.append(rec)
        self._open = []

    def write(self, rank: int) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"rank{rank}.jsonl"), "w") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")


_TIMER: OpTimer | None = None


def timer(device: torch.device | str) -> OpTimer | None:
    """This process's timer when ``AFDSERVE_OP_TIMING`` is set, else None."""
    global _TIMER
    directory = os.environ.get(ENV)
    if directory and _TIMER is None:
        _TIMER = OpTimer(directory, device)
    return _TIMER


def write(rank: int) -> None:
    if _TIMER is not None:
        _TIMER.write(rank)
