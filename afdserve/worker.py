"""Attention and expert worker processes of a disaggregated deployment.

Every rank runs the same loop of global steps. A step starts with one small all-reduce of
``[has_work, stop]`` over all ranks, so every attention group (busy or idle) and every expert
group take part in the same steps and make the same transport calls: nobody waits for a
message that will not come. Attention-group leaders talk to the frontend (``LLM`` or the API
server) over a ``multiprocessing.connection`` socket.

Started by the launcher (one machine) or by ``torchrun -m afdserve.worker`` (several).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection

import torch
import torch.distributed as dist

from afdserve.build import num_kv_blocks, torch_dtype
from afdserve.config import EngineConfig
from afdserve.core import InvalidRequest
from afdserve.engine import Engine
from afdserve.expert.placement import contiguous_placement
from afdserve.kv_cache import allocate_kv_cache
from afdserve.models.loader import Checkpoint
from afdserve.models.moe_model import AttentionModel, ExpertModel
from afdserve.pipeline_executor import AttnPipelineExecutor, ExpertPipelineExecutor
from afdserve.runner import prepare, sample_logits
from afdserve.scheduler import Scheduler
from afdserve.tokenizer import eos_token_ids, load_tokenizer
from afdserve.transport.groups import init_distributed
from afdserve.transport.topology import Topology
from afdserve.transport.torch_p2p import TorchP2PTransport

IDLE_SLEEP_S = 0.002


@dataclass(frozen=True)
class WorkerSpec:
    config: EngineConfig
    frontend_address: tuple[str, int]
    authkey: bytes
    timeout_s: float = 120.0

    @property
    def topology(self) -> Topology:
        p = self.config.parallel
        return Topology(p.attn_groups, p.attn_tp, p.expert_groups, p.expert_tp)


def worker_main(rank: int, world_size: int, init_method: str, spec: WorkerSpec) -> None:
    topo = spec.topology
    backend = "nccl" if spec.config.device.startswith("cuda") else "gloo"
    groups = init_distributed(topo, rank, backend, init_method, spec.timeout_s)
    role = topo.role_of(rank)
    torch.manual_seed(spec.config.seed)
    if spec.config.device == "cpu":
        torch.set_num_threads(1)  # many ranks share the cores
    try:
        if role.role == "attn":
            AttnWorker(spec, topo, groups, rank).loop()
        else:
            ExpertWorker(spec, topo, groups, rank).loop()
    finally:
        groups.destroy()


def step_flags(has_work: bool, stop: bool) -> tuple[bool, bool]:
    """The per-step agreement of all ranks: does anyone have work, does anyone stop."""
    flags = torch.tensor([int(has_work), int(stop)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def _tp_all_reduce(group):
    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        if x.numel():  # every rank of the group has the same shape, so all skip together
            dist.all_reduce(x, group=group)
        return x
    return all_reduce if group is not None else (lambda x: x)


class ExpertWorker:
    def __init__(self, spec: WorkerSpec, topo: Topology, groups, rank: int):
        cfg, mc = spec.config, spec.config.model_config
        role = topo.role_of(rank)
        placement = contiguous_placement(mc.num_experts, topo.n_e)
        tp_group = groups.expert_tp[role.group] if topo.tp_e > 1 else None
        ckpt = Checkpoint(cfg.model, torch_dtype(cfg.dtype), cfg.device)
        experts = ExpertModel(mc, ckpt, placement.experts_of_group(role.group), role.tp_rank, topo.tp_e,
                              all_reduce=_tp_all_reduce(tp_group))
        ckpt.close()
        leader = role.tp_rank == 0
        transport = None
        if leader:
            transport = TorchP2PTransport.expert_side(topo, rank, mc.hidden_size, mc.top_k, torch_dtype(cfg.dtype),
                                                      cfg.device, cfg.scheduler.max_num_batched_tokens, groups=groups)
        bcast = None
        if tp_group is not None:
            src = topo.expert_rank(role.group, 0)
            bcast = lambda rows: _broadcast_object(rows, src, tp_group)  # noqa: E731
        self.executor = ExpertPipelineExecutor(experts, transport, mc.num_layers, cfg.parallel.micro_batches, bcast)

    def loop(self) -> None:
        while True:
            has_work, stop = step_flags(False, False)
            if stop:
                return
            if not has_work:
                time.sleep(IDLE_SLEEP_S)
                continue
            self.executor.step()


def _broadcast_object(obj, src: int, group):
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _broadcast_tensor(src: int, group):
    def bcast(y_TD: torch.Tensor | None, like_TD: torch.Tensor) -> torch.Tensor:
        if y_TD is None:
            y_TD = torch.empty_like(like_TD)
        if y_TD.numel():
            dist.broadcast(y_TD, src=src, group=group)
        return y_TD
    return bcast


class AttnWorker:
    def __init__(self, spec: WorkerSpec, topo: Topology, groups, rank: int):
        cfg, mc = spec.config, spec.config.model_config
        self.role, self.spec = topo.role_of(rank), spec
        self.leader = self.role.tp_rank == 0
        tp_group = groups.attn_tp[self.role.group] if topo.tp_a > 1 else None
        self.tp_group, self.tp_src = tp_group, topo.attn_rank(self.role.group, 0)
        ckpt = Checkpoint(cfg.model, torch_dtype(cfg.dtype), cfg.device)
        self.attn = AttentionModel(mc, ckpt, self.role.tp_rank, topo.tp_a, all_reduce=_tp_all_reduce(tp_group))
        ckpt.close()
        kv_heads = self.attn.num_local_kv_heads
        blocks = num_kv_blocks(cfg, kv_heads)
        kv = allocate_kv_cache(mc.num_layers, blocks, cfg.cache.block_size, kv_heads, mc.head_dim,
                               torch_dtype(cfg.dtype), cfg.device)
        transport = None
        if self.leader:
            transport = TorchP2PTransport.attn_side(topo, rank, mc.hidden_size, mc.top_k, torch_dtype(cfg.dtype),
                                                    cfg.device, cfg.scheduler.max_num_batched_tokens, groups=groups)
        bcast = _broadcast_tensor(self.tp_src, tp_group) if tp_group is not None else None
        m = cfg.parallel.micro_batches
        self.executor = AttnPipelineExecutor(self.attn, kv, contiguous_placement(mc.num_experts, topo.n_e),
                                             transport, m, bcast)
        self.m, self.engine, self.conn = m, None, None
        if self.leader:
            tokenizer = load_tokenizer(cfg.model)
            sched = Scheduler(cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens, blocks,
                              cfg.cache.block_size, micro_batches=m)
            self.engine = Engine(self.attn, self.executor, sched, cfg.max_model_len, tokenizer,
                                 eos_token_ids(cfg.model, mc, tokenizer), device=cfg.device,
                                 seed=cfg.seed + self.role.group)
            self.conn = _connect(spec.frontend_address, spec.authkey, spec.timeout_s)
            self.conn.send(("hello", self.role.group, {"num_blocks": blocks, "block_size": cfg.cache.block_size}))

    def loop(self) -> None:
        stop_requested = False
        while True:
            if self.leader:
                stop_requested = self._drain_frontend() or stop_requested
            has_work = self.leader and self.engine.has_unfinished()
            any_work, stop = step_flags(has_work, stop_requested)
            if stop:
                return
            if not any_work:
                time.sleep(IDLE_SLEEP_S)
                continue
            self._step()

    def _step(self) -> None:
        if not self.leader:
            inputs = _broadcast_object(None, self.tp_src, self.tp_group)
            self.executor.run(inputs)
            return
        plan = self.engine.scheduler.schedule()
        bs = self.engine.scheduler.block_size
        inputs = [prepare(mb, bs, self.spec.config.device) for mb in plan.micro_batches]
        if self.tp_group is not None:
            _broadcast_object(inputs, self.tp_src, self.tp_group)
        hidden = self.executor.run(inputs)
        if plan.chunks:
            updated = self.engine.update(plan, sample_logits(self.attn, inputs, hidden))
            self.conn.send(("out", [_update(r) for r in updated], self.engine.stats()))

    def _drain_frontend(self) -> bool:
        """Apply queued frontend messages; True once a shutdown was asked for."""
        changed = False
        while self.conn.poll(0):
            msg = self.conn.recv()
            if msg[0] == "shutdown":
                return True
            changed = True
            if msg[0] == "abort":
                self.engine.abort_request(msg[1])
                continue
            _, rid, ids, params, prompt = msg
            try:
                self.engine.add_request(rid, ids, params, prompt=prompt)
            except InvalidRequest as e:
                self.conn.send(("error", rid, str(e), e.param))
        if changed:
            self.conn.send(("stats", self.engine.stats()))
        return False


def _update(req) -> tuple:
    """What the frontend needs of a request after a step (the newest token and its logprobs)."""
    lp = req.output_logprobs[-1] if req.output_logprobs else None
    return (req.request_id, req.output_token_ids[-1], lp, req.output_text, req.finish_reason, req.stop_reason)


def _connect(address: tuple[str, int], authkey: bytes, timeout_s: float) -> Connection:
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
    from afdserve.launcher import rank_from_env
    from afdserve.llm import make_config

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
    worker_main(rank, world_size, "env://", WorkerSpec(cfg, address, authkey))
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
