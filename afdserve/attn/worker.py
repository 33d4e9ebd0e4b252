"""Attention worker: one rank of an attention group (a data-parallel replica, TP inside).
The group's leader owns the engine (requests, scheduler, KV cache bookkeeping, sampler) and
talks to the frontend; the other TP ranks receive each step's inputs from it."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from afdserve.build import load_progress, make_scheduler, num_kv_blocks, torch_dtype
from afdserve.core import InvalidRequest, Request
from afdserve.engine import Engine
from afdserve.expert.eplb import initial_placement
from afdserve.kv_cache import allocate_kv_cache
from afdserve.models.loader import open_checkpoint
from afdserve.models.moe_model import AttentionModel, ExpertModel
from afdserve.pipeline_executor import AttnPipelineExecutor, ColocatedExecutor
from afdserve.tokenizer import eos_token_ids, load_tokenizer
from afdserve.transport.all_to_all import AllToAllExchange
from afdserve.transport.select import make_transport
from afdserve.transport.topology import Topology
from afdserve.worker import (
    IDLE_SLEEP_S,
    StepSync,
    WorkerSpec,
    broadcast_object,
    broadcast_tensor,
    connect,
    step_graphs_enabled,
    tp_all_reduce,
)


class AttnWorker:
    def __init__(self, spec: WorkerSpec, topo: Topology, groups, rank: int):
        cfg, mc = spec.config, spec.config.model_config
        self.role, self.spec = topo.role_of(rank), spec
        self.leader = self.role.tp_rank == 0
        tp_group = groups.attn_tp[self.role.group] if topo.tp_a > 1 else None
        self.tp_group, self.tp_src = tp_group, topo.attn_rank(self.role.group, 0)
        ckpt = open_checkpoint(cfg.model, cfg.load_format, torch_dtype(cfg.dtype), cfg.device, cfg.seed)
        with load_progress(mc.num_layers, "loading attention weights", spec.show_progress and rank == 0) as bar:
            self.attn = AttentionModel(mc, ckpt, self.role.tp_rank, topo.tp_a, all_reduce=tp_all_reduce(tp_group),
                                       router_skew=cfg.router_skew, seed=cfg.seed, on_tensor=lambda: bar.update(1))
        ckpt.close()
        self._load_more(spec, rank)  # before the KV cache, which takes the memory left
        kv_heads = self.attn.num_local_kv_heads
        blocks = num_kv_blocks(cfg, kv_heads, cfg.device)
        if tp_group is not None:  # sized from each GPU's free memory: the group's ranks take the smallest
            agreed = torch.tensor([blocks])
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=tp_group)
            blocks = int(agreed)
        kv = allocate_kv_cache(mc.num_layers, blocks, cfg.cache.block_size, kv_heads, mc.head_dim,
                               torch_dtype(cfg.dtype), cfg.device)
        m = cfg.parallel.micro_batches
        groups.wait_for_all()  # every rank has loaded its weights: the transport's set-up may start
        self.executor = self._make_executor(spec, topo, groups, rank, kv)
        self.graphs = None  # whole decode steps in CUDA graphs (captured with the expert side's)
        if step_graphs_enabled(cfg, topo, self.executor.transport):
            from afdserve.cuda_graphs import PipelineGraphs, capture_sizes

            self.graphs = PipelineGraphs(self.executor, capture_sizes(cfg), cfg.max_model_len, cfg.cache.block_size)
        self.sync = StepSync(topo, rank)
        self.engine, self.conn = None, None
        if self.leader:
            tokenizer = load_tokenizer(cfg.model, required=cfg.load_format != "dummy")
            sched = make_scheduler(cfg, blocks, m)
            self.engine = Engine(self.attn, self.graphs or self.executor, sched, cfg.max_model_len, tokenizer,
                                 eos_token_ids(cfg.model, mc, tokenizer), device=cfg.device,
                                 seed=cfg.seed + self.role.group)
            self.conn = connect(spec.frontend_address, spec.authkey, spec.timeout_s)
            graphs = sorted(self.graphs.graphs) if self.graphs is not None else []
            self.conn.send(("hello", self.role.group, {"num_blocks": blocks, "block_size": cfg.cache.block_size,
                                                       "cuda_graph_buckets": graphs}))

    def _load_more(self, spec: WorkerSpec, rank: int) -> None:
        """Weights this rank holds besides attention (none here)."""

    def _make_executor(self, spec: WorkerSpec, topo: Topology, groups, rank: int, kv) -> AttnPipelineExecutor:
        """The ping-pong executor; only the leader holds the transport to the expert groups."""
        cfg, mc = spec.config, spec.config.model_config
        transport = None
        if self.leader:
            transport = make_transport(cfg.parallel.afd_transport, groups, rank, mc.hidden_size, mc.top_k,
                                       torch_dtype(cfg.dtype), cfg.scheduler.max_num_batched_tokens,
                                       cfg.parallel.micro_batches, spec.timeout_s)
        bcast = inputs_bcast = None
        if self.tp_group is not None:
            bcast = broadcast_tensor(self.tp_src, self.tp_group)
            inputs_bcast = lambda inputs: broadcast_object(  # noqa: E731
                None if inputs is None else [inp.for_peers() for inp in inputs], self.tp_src, self.tp_group)
        return AttnPipelineExecutor(self.attn, kv, initial_placement(cfg), transport, cfg.parallel.micro_batches,
                                    bcast, inputs_bcast)

    def loop(self) -> None:
        stop_requested = False
        while True:
            if self.leader:
                stop_requested = self._drain_frontend() or stop_requested
            step = self.sync.exchange(self.leader and self.engine.has_unfinished(), stop_requested)
            if step.stop:
                return
            if step.switch_to is not None:
                self.executor.placement = step.switch_to
                if self.graphs is not None:  # the captured steps read the old placement's tables
                    self.graphs.capture()
                if self.leader:
                    self.conn.send(("placement_applied", step.switch_to.version))
            if not step.any_work:
                time.sleep(IDLE_SLEEP_S)
                continue
            self._step()

    def _step(self) -> None:
        """One global step; TP peers get the leader's inputs inside ``executor.run``."""
        if not self.leader:
            self.executor.run(None)
            return
        had_work = self.engine.has_unfinished()
        updated = self.engine.step(always_run=True)  # an idle replica still takes part
        self.executor.check_transport()  # before any output leaves: an error recorded on the GPU raises
        if had_work:
            # numpy, not a tensor: the connection's pickler would pass a tensor as a shared-memory handle
            stats = self.engine.stats() | {"expert_load": self.executor.take_load().cpu().numpy()}
            stats |= {k: tuple(v) for k, v in self.executor.timing.items()}
            self.conn.send(("out", [_update(r) for r in updated], stats))

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
            elif msg[0] == "placement":
                self.sync.queued = msg[1]
            else:
                self._add(*msg[1:])
        if changed:
            self.conn.send(("stats", self.engine.stats()))
        return False

    def _add(self, rid: str, ids: list[int], params, prompt: str | None) -> None:
        try:
            self.engine.add_request(rid, ids, params, prompt=prompt)
        except InvalidRequest as e:
            self.conn.send(("error", rid, str(e), e.param))


class ColocatedWorker(AttnWorker):
    """Colocated layout: an attention replica (the engine, as above) that also holds expert
    group ``rank`` and exchanges routed rows with every rank per layer. Its placement is fixed
    at start (the frontend refuses live re-placement for this layout)."""

    def _load_more(self, spec: WorkerSpec, rank: int) -> None:
        """This rank's share of the experts (expert group ``rank`` of the initial placement)."""
        cfg, mc = spec.config, spec.config.model_config
        self.placement = initial_placement(cfg)
        per_layer = [self.placement.for_layer(layer).experts_of_group(rank) for layer in range(mc.num_layers)]
        ckpt = open_checkpoint(cfg.model, cfg.load_format, torch_dtype(cfg.dtype), cfg.device, cfg.seed)
        with load_progress(mc.num_layers, "loading expert weights", spec.show_progress and rank == 0) as bar:
            self.experts = ExpertModel(mc, ckpt, per_layer, 0, 1, on_tensor=lambda: bar.update(1))
        ckpt.close()

    def _make_executor(self, spec: WorkerSpec, topo: Topology, groups, rank: int, kv) -> ColocatedExecutor:
        cfg, mc = spec.config, spec.config.model_config
        exchange = AllToAllExchange(rank, topo.n_a, mc.hidden_size, mc.top_k, torch_dtype(cfg.dtype), cfg.device,
                                    cfg.scheduler.max_num_batched_tokens, group=groups.a2e)
        return ColocatedExecutor(self.attn, kv, self.placement, self.experts, exchange, cfg.parallel.micro_batches)


def _update(req: Request) -> tuple:
    """What the frontend needs of a request after a step: the newest token and its logprobs,
    the prompt logprobs with the first token, and the text as (kept, added): keep the first
    ``kept`` characters of what was sent, then append ``added`` (the text only grows, except
    when a stop string cuts it at the end)."""
    lp = req.output_logprobs[-1] if req.output_logprobs else None
    text = req.output_text
    kept = min(req.text_sent, len(text))
    req.text_sent = len(text)
    # prompt logprobs are complete once the first token is sampled: sent with it, once
    prompt_lps = None
    if len(req.output_token_ids) == 1 and req.params.prompt_logprobs is not None:
        prompt_lps = (req.prompt_logprobs, req.prompt_logprob_ranks)
    return (req.request_id, req.output_token_ids[-1], lp, kept, text[kept:], req.finish_reason, req.stop_reason,
            req.queue_s, prompt_lps)
