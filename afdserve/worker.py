"""Attention and expert worker processes of a disaggregated deployment: what both share.

Every rank runs the same loop of global steps. A step starts with one small all-reduce of
``[has_work, stop, announce, loading]`` over all ranks (``StepSync``), so every attention
group (busy or idle) and every expert group take part in the same steps and make the same
transport calls: nobody waits for a message that will not come. The same agreement applies
a new expert placement atomically: it is announced (broadcast from attention group 0's
leader), expert ranks load the new weights in the background, and all ranks switch at the
first step where no rank is still loading.

Attention-group leaders talk to the frontend (``LLM`` or the API server) over a
``multiprocessing.connection`` socket. Started by the launcher (one machine) or by
``torchrun -m afdserve.worker`` (several).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection

import torch
import torch.distributed as dist

from afdserve import op_timing
from afdserve.config import EngineConfig
from afdserve.transport.groups import init_distributed
from afdserve.transport.topology import Topology

IDLE_SLEEP_S = 0.002


@dataclass(frozen=True)
class WorkerSpec:
    config: EngineConfig
    frontend_address: tuple[str, int]
    authkey: bytes
    timeout_s: float = 120.0
    show_progress: bool = False

    @property
    def topology(self) -> Topology:
        p = self.config.parallel
        return Topology(p.attn_groups, p.attn_tp, p.expert_groups, p.expert_tp, colocated=p.colocated)


def worker_main(rank: int, world_size: int, init_method: str, spec: WorkerSpec) -> None:
    from afdserve.attn.worker import AttnWorker, ColocatedWorker
    from afdserve.expert.worker import ExpertWorker

    topo = spec.topology
    backend, device = _backend(spec.config.device, world_size, rank)
    groups = init_distributed(topo, rank, backend, init_method, spec.timeout_s, device, spec.config.agreement())
    torch.manual_seed(spec.config.seed)
    if spec.config.device == "cpu":
        torch.set_num_threads(1)  # many ranks share the cores
    worker = {"attn": AttnWorker, "expert": ExpertWorker, "colocated": ColocatedWorker}[topo.role_of(rank).role]
    worker(spec, topo, groups, rank).loop()
    op_timing.write(rank)
    # only after a clean exit: tearing down NCCL groups with operations in flight can hang, so a
    # rank that raised leaves without it (the launcher reports the error and stops the others)
    groups.destroy()


@dataclass
class StepAgreement:
    any_work: bool
    stop: bool
    announced: object = None  # a placement every rank received this step (start loading it)
    switch_to: object = None  # a placement every rank applies before this step


class StepSync:
    """The per-step agreement of all ranks, including live expert re-placement."""

    def __init__(self, topo: Topology, rank: int, loading: Callable[[], bool] = lambda: False):
        self.src = topo.attn_rank(0, 0)
        self.is_src, self.loading = rank == self.src, loading
        self.queued = None  # on the source: a placement waiting to be announced
        self.pending = None  # announced on every rank, not active yet

    def exchange(self, has_work: bool, stop: bool) -> StepAgreement:
        announce = self.is_src and self.queued is not None and self.pending is None
        flags = torch.tensor([int(has_work), int(stop), int(announce), int(self.loading())])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        out = StepAgreement(bool(flags[0]), bool(flags[1]))
        if flags[2]:
            self.pending = out.announced = broadcast_object(self.queued, self.src, None)
            self.queued = None
        elif self.pending is not None and not flags[3]:
            out.switch_to, self.pending = self.pending, None
        return out


def _backend(device: str, world_size: int, rank: int) -> tuple[str, str | None]:
    """(torch.distributed backend, device) of a rank: NCCL on CUDA, unless more ranks run on
    this host than it has GPUs (NCCL refuses two ranks on one GPU): then Gloo, which carries
    the few tensor collectives through the host (for development and tests on one GPU)."""
    if not device.startswith("cuda"):
        return "gloo", None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if local <= torch.cuda.device_count():
        return "nccl", None
    if rank == 0:
        print(f"afdserve: {local} ranks share {torch.cuda.device_count()} GPU(s); NCCL cannot run two ranks on one "
              "GPU, so tensor collectives go through Gloo (slow: for development and tests)", file=sys.stderr)
    return "gloo", "cuda"


def step_graphs_enabled(cfg: EngineConfig, topo: Topology, transport) -> bool:
    """Whether both sides run whole decode steps as CUDA graphs: on CUDA, unless
    ``enforce_eager``, with the shared-slot transport (every hot-path call on the GPU) and TP 1
    on both sides. Every leader decides alike (the transport choice is agreed), since the two
    sides capture together."""
    from afdserve.transport.slots import SlotTransport

    return (cfg.device.startswith("cuda") and not cfg.enforce_eager and topo.tp_a == 1 and topo.tp_e == 1
            and isinstance(transport, SlotTransport))


def tp_all_reduce(group):
    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        if x.numel():  # every rank of the group has the same shape, so all skip together
            dist.all_reduce(x, group=group)
        return x
    return all_reduce if group is not None else (lambda x: x)


def broadcast_object(obj, src: int, group):
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def broadcast_tensor(src: int, group):
    def bcast(y_TD: torch.Tensor | None, like_TD: torch.Tensor) -> torch.Tensor:
        if y_TD is None:
            y_TD = torch.empty_like(like_TD)
        if y_TD.numel():
            dist.broadcast(y_TD, src=src, group=group)
        return y_TD
    return bcast


def connect(address: tuple[str, int], authkey: bytes, timeout_s: float) -> Connection:
    """The frontend may start listening after this rank is up: retry until the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client(address, authkey=authkey)
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m afdserve.worker --model DIR [parallel options]``: one process per rank.

    Rank 0 can also act as the offline frontend (``--prompts-file``/``--output-file``):
    it generates greedily for the prompts and writes the outputs as JSON."""
    import argparse
    import os
    import threading
    from multiprocessing.connection import Listener

    from afdserve.__main__ import add_engine_args, engine_kwargs
    from afdserve.config import make_config
    from afdserve.launcher import rank_from_env

    p = argparse.ArgumentParser(prog="python -m afdserve.worker")
    p.add_argument("--model", required=True)
    p.add_argument("--frontend-host", default="127.0.0.1")
    p.add_argument("--frontend-port", type=int, default=29511)
    p.add_argument("--prompts-file", default=None, help="JSON list of prompts (text or token ids); rank 0 only")
    p.add_argument("--output-file", default=None)
    p.add_argument("--max-tokens", type=int, default=16)
    add_engine_args(p)
    args = p.parse_args(argv)
    cfg = make_config(args.model, **engine_kwargs(args))
    rank, world_size = rank_from_env()
    authkey = os.environ.get("AFDSERVE_AUTHKEY", "afdserve-dev").encode()
    address = (args.frontend_host, args.frontend_port)
    thread = None
    if rank == 0 and args.prompts_file:
        from transformers import AutoTokenizer  # noqa: F401 -- import once, before two threads race to
        listener = Listener(address, authkey=authkey)
        thread = threading.Thread(target=_offline_frontend, args=(cfg, listener, args), daemon=True)
        thread.start()
    worker_main(rank, world_size, "env://", WorkerSpec(cfg, address, authkey, timeout_s=cfg.dist_timeout_s))
    if thread is not None:
        thread.join()
    return 0


def _offline_frontend(cfg: EngineConfig, listener, args) -> None:
    import json

    from afdserve.core import SamplingParams
    from afdserve.frontend import AFDFrontend
    from afdserve.llm import LLM

    llm = LLM.from_engine(cfg, AFDFrontend.attach(cfg, listener))
    with open(args.prompts_file) as f:
        prompts = json.load(f)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True))
    with open(args.output_file, "w") as f:
        json.dump([{"token_ids": o.outputs[0].token_ids, "text": o.outputs[0].text} for o in outs], f)
    llm.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
