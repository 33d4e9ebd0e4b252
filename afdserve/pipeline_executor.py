"""Executors of the ping-pong schedule (``pipeline.py``): each side walks its op list;
per-micro-batch state is explicit, never global. Legend: T tokens, D hidden, K top-k."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from afdserve import op_timing
from afdserve.models.moe_model import AttentionModel, AttnHalfOut, ExpertModel, combine
from afdserve.pipeline import Op, OpKind, attention_schedule, expert_schedule
from afdserve.transport.reference import route, unroute


@dataclass
class _MicroBatchState:
    inp: object  # runner.MicroBatchInput
    h_TD: torch.Tensor | None = None
    out: AttnHalfOut | None = None
    handle: object = None  # transport handle of the in-flight dispatch


class AttnPipelineExecutor:
    """Attention side of the ping-pong pipeline: runs ``attention_schedule`` for the step's
    ``m`` micro-batches, sending rows to the expert groups and combining their replies.

    ``transport`` is None on attention TP ranks other than the leader: they get the
    combined expert output by ``tp_broadcast`` from the leader.
    """

    def __init__(self, attn: AttentionModel, kv, placement, transport, m: int,
                 tp_broadcast=None, inputs_broadcast=None):
        self.attn, self.kv, self.placement, self.transport, self.m = attn, kv, placement, transport, m
        self.tp_broadcast, self.inputs_broadcast = tp_broadcast, inputs_broadcast
        self.schedule = attention_schedule(attn.cfg.num_layers, m)
        # routed (token, choice) pairs per layer and expert since the last report
        self.load_LE = torch.zeros(attn.cfg.num_layers, attn.cfg.num_experts, dtype=torch.int64,
                                   device=attn.embed_VD.device)
        # host-side (total seconds, count): issuing dispatches, waiting for combines, and the
        # per-step sum of those waits (attention idle inside the pipeline: its bubble); eager
        # steps only (a replayed graph's waits happen on the GPU)
        self.timing = {"dispatch_seconds": [0.0, 0], "combine_seconds": [0.0, 0], "bubble_seconds": [0.0, 0]}
        self.timer = op_timing.timer(attn.embed_VD.device)  # benchmarks only (AFDSERVE_OP_TIMING)

    def take_load(self) -> torch.Tensor:
        """The load counted since the previous call (and reset it, in place: a CUDA graph
        counts into this tensor)."""
        load = self.load_LE.clone()
        self.load_LE.zero_()
        return load

    def run(self, inputs: list | None) -> list[torch.Tensor]:
        """All layers of the step's ``m`` micro-batches. With tensor parallelism the leader's
        inputs reach the other ranks of the group here (they pass None)."""
        if self.inputs_broadcast is not None:
            inputs = self.inputs_broadcast(inputs)
        if len(inputs) != self.m:
            raise ValueError(f"expected {self.m} micro-batches, got {len(inputs)}")
        self.begin_step([inp.token_ids_T.shape[0] for inp in inputs])
        return self.run_ops(inputs)

    def begin_step(self, sizes: list[int]) -> None:
        """Tell the expert groups this step's micro-batch sizes (the most rows each may get)."""
        if self.transport is not None:
            self.transport.begin_step(sizes)

    def run_ops(self, inputs: list, timed: bool = True) -> list[torch.Tensor]:
        """The step's ops after ``begin_step`` (what a CUDA graph captures: untimed, neither
        the op timer nor the host-side ``timing``)."""
        states = [_MicroBatchState(inp) for inp in inputs]
        waited_before = self.timing["combine_seconds"][0]
        timer = self.timer if timed else None
        if timer:
            timer.begin_step()
        for op in self.schedule:
            st = states[op.mb]
            if op.kind is OpKind.ATTN:
                tok = timer.start("attn") if timer else None
                if op.layer == 0:
                    st.h_TD = self.attn.embed(st.inp.token_ids_T)
                st.out = self.attn.attention_half(op.layer, st.h_TD, st.inp.meta, self.kv[op.layer])
                if timer:
                    timer.stop(tok)
            elif op.kind is OpKind.DISPATCH:
                tok = timer.start("route") if timer else None
                self._dispatch(op, st, timed)
                if timer:
                    timer.stop(tok)
            elif op.kind is OpKind.COMBINE:
                st.h_TD = combine(st.out, self._combine_wait(st, timed))
                st.out = None
        if self.transport is not None and timed:
            _add(self.timing["bubble_seconds"], self.timing["combine_seconds"][0] - waited_before)
        if timer:
            timer.end_step(sum(inp.token_ids_T.shape[0] for inp in inputs))
        return [st.h_TD for st in states]

    def check_transport(self) -> None:
        """Raise for a transport error recorded on the device during the last step."""
        if self.transport is not None:
            self.transport.check()

    def _dispatch(self, op: Op, st: _MicroBatchState, timed: bool) -> None:
        if self.transport is None:
            return
        out = st.out
        self._count_load(op.layer, out)
        t0 = time.perf_counter()
        st.handle = self.transport.dispatch_tokens(op.layer, op.mb, out.x_TD, out.topk_ids_TK, out.topk_w_TK,
                                                   self.placement.for_layer(op.layer))
        if timed:
            _add(self.timing["dispatch_seconds"], time.perf_counter() - t0)

    def _count_load(self, layer: int, out: AttnHalfOut) -> None:
        """Count the layer's routed pairs per expert (no host sync; ids of -1, padding, count 0)."""
        flat = out.topk_ids_TK.flatten()
        self.load_LE[layer].index_add_(0, flat.clamp(min=0), (flat >= 0).to(torch.int64))

    def _route(self, layer: int, out: AttnHalfOut):
        """Count the layer's routed pairs and split the rows per expert group."""
        self._count_load(layer, out)
        return route(out.x_TD, out.topk_ids_TK, out.topk_w_TK, self.placement.for_layer(layer))

    def _combine_wait(self, st: _MicroBatchState, timed: bool) -> torch.Tensor:
        y_TD = None
        if self.transport is not None:
            t0 = time.perf_counter()
            y_TD = self.transport.combine_tokens(st.handle)
            if timed:
                _add(self.timing["combine_seconds"], time.perf_counter() - t0)
        if self.tp_broadcast is not None:
            y_TD = self.tp_broadcast(y_TD, st.out.x_TD)
        return y_TD


def _add(acc: list, seconds: float) -> None:
    acc[0] += seconds
    acc[1] += 1


class ExpertPipelineExecutor:
    """Expert side: one global step of ``expert_schedule``. Rows from every attention group
    are concatenated, run through the experts held here, and split back per sender."""

    def __init__(self, experts: ExpertModel, transport, num_layers: int, m: int, tp_broadcast=None,
                 device: torch.device | str = "cpu"):
        self.experts, self.transport, self.tp_broadcast = experts, transport, tp_broadcast
        self.schedule = expert_schedule(num_layers, m)
        self.timer = op_timing.timer(device)  # benchmarks only (AFDSERVE_OP_TIMING)

    def step(self) -> None:
        self.begin_step()
        self.run_ops()

    def begin_step(self) -> list[list[int]] | None:
        """The step's announced micro-batch sizes, ``[mb][attention group]`` (None off the leader)."""
        return self.transport.begin_step() if self.transport is not None else None

    def run_ops(self, timed: bool = True) -> None:
        """The step's ops after ``begin_step`` (what a CUDA graph captures, untimed)."""
        received, replies, timer, rows_in = {}, [], self.timer if timed else None, 0
        if timer:
            timer.begin_step()
        for op in self.schedule:
            key = (op.layer, op.mb)
            if op.kind is OpKind.RECEIVE:
                rows = None
                if self.transport is not None:
                    rows = self.transport.receive_wait(self.transport.receive(op.layer, op.mb))
                received[key] = self.tp_broadcast(rows) if self.tp_broadcast is not None else rows
            elif op.kind is OpKind.EXPERT:
                tok = timer.start("expert") if timer else None
                rows_in += sum(r.num_rows for r in received[key])
                received[key] = expert_rows(self.experts, op.layer, received[key])
                if timer:
                    timer.stop(tok)
            elif op.kind is OpKind.REPLY and self.transport is not None:
                replies.append(self.transport.reply(op.layer, op.mb, received.pop(key)))
            else:
                received.pop(key, None)
        for handle in replies:
            self.transport.reply_wait(handle)
        if timer:
            timer.end_step(rows_in)


def expert_rows(experts: ExpertModel, layer: int, rows: list) -> list[torch.Tensor]:
    """The experts held here over the rows of every sender, split back per sender."""
    sizes = [r.x_ND.shape[0] for r in rows]
    x_TD = torch.cat([r.x_ND for r in rows])
    ids_TK = torch.cat([r.ids_NK for r in rows]).long()
    w_TK = torch.cat([r.w_NK for r in rows])
    y_TD = experts.expert_half(layer, x_TD, ids_TK, w_TK)
    return list(torch.split(y_TD, sizes))


class ColocatedExecutor(AttnPipelineExecutor):
    """Colocated layout (each rank an attention replica and an expert group): per layer and
    micro-batch, attention here, the routed rows to every rank and back in two all-to-alls
    (``transport.all_to_all``), the experts held here in between. Micro-batches run one after
    another. Every rank runs the same layers and micro-batches (empty ones when idle)."""

    def __init__(self, attn: AttentionModel, kv, placement, experts: ExpertModel, exchange, m: int):
        super().__init__(attn, kv, placement, exchange, m)
        self.experts = experts

    def run(self, inputs: list) -> list[torch.Tensor]:
        if len(inputs) != self.m:
            raise ValueError(f"expected {self.m} micro-batches, got {len(inputs)}")
        timer = self.timer
        if timer:
            timer.begin_step()
        h = [self.attn.embed(inp.token_ids_T) for inp in inputs]
        for layer in range(self.attn.cfg.num_layers):
            for mb, inp in enumerate(inputs):
                tok = timer.start("attn") if timer else None
                out = self.attn.attention_half(layer, h[mb], inp.meta, self.kv[layer])
                sends, routing = self._route(layer, out)
                tok = timer.lap(tok, "exchange") if timer else None
                t0 = time.perf_counter()
                rows, sent, received = self.transport.dispatch(layer, mb, sends)
                t1 = time.perf_counter()
                tok = timer.lap(tok, "expert") if timer else None
                outs = expert_rows(self.experts, layer, rows)
                tok = timer.lap(tok, "exchange") if timer else None
                t2 = time.perf_counter()
                partials = self.transport.combine(outs, sent, received)
                _add(self.timing["dispatch_seconds"], t1 - t0)
                _add(self.timing["combine_seconds"], time.perf_counter() - t2)
                h[mb] = combine(out, unroute(partials, routing, out.x_TD.shape[0]))
                if timer:
                    timer.stop(tok)
        if timer:
            timer.end_step(sum(inp.token_ids_T.shape[0] for inp in inputs))
        return h
