"""CUDA graphs for decode steps, captured once per batch-size bucket and replayed, so Python
and kernel-launch overhead stop setting the step time. Prefill and mixed steps run eagerly.

- ``GraphedExecutor`` (single process): the forward of one decode micro-batch, every layer.
- ``PipelineGraphs`` / ``ExpertGraphs`` (disaggregated, shared-slot transport): a whole global
  step of each side, the transport's sends and GPU-side waits included, so nothing on the hot
  path waits for the host. The two sides capture together at start-up (and after a live
  re-placement): every capture is framed by two real steps the other side takes part in (a
  warm-up before, a warm replay after), in the same bucket order on every leader.

Inputs are copied into static buffers first; padding rows write no KV (slot -1), attend to
one cached token of block 0, choose no expert (so they read no expert weights and travel as
rows of id -1), and their outputs are dropped. Graphs of one executor share a memory pool
(captured largest first). The decode attention kernel is captured for the longest context
(``max_model_len``) and masks by each row's context length.
Legend: B padded batch, M blocks per sequence, T tokens, D hidden."""

from __future__ import annotations

import contextlib

import torch

from afdserve.config import ConfigError
from afdserve.layers.attention import AttnMeta
from afdserve.runner import MicroBatchInput, SerialExecutor
from afdserve.transport.groups import STARTUP_TIMEOUT_S


def buckets(max_batch: int) -> list[int]:
    """Batch sizes captured, up to ``max_batch``: padding a batch to its bucket adds at most 7
    rows or a quarter of the batch (a disaggregated step's micro-batches are a fraction of a
    large batch, anywhere between the round sizes)."""
    sizes = [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    sizes += range(640, max_batch, 128)
    return [b for b in sizes if b < max_batch] + [max_batch]


def capture_sizes(cfg) -> list[int]:
    """The batch sizes an engine captures (``cfg.scheduler.cuda_graph_sizes``, vLLM's flag; one
    value N gives this engine's own ladder up to N, where vLLM's is 1, 2, 4, then steps of 8):
    decode batches are at most max_num_seqs and at most the token budget."""
    sched = cfg.scheduler
    largest = min(sched.max_num_seqs, sched.max_num_batched_tokens)
    asked = sched.cuda_graph_sizes
    if asked is None:
        return buckets(largest)
    if len(asked) == 1:
        return buckets(min(asked[0], largest))
    sizes = sorted({b for b in asked if b <= largest})
    if not sizes:
        raise ConfigError(f"cuda_graph_sizes {list(asked)}: none is at most the largest decode batch, {largest} "
                          "(max_num_seqs, within max_num_batched_tokens)")
    return sizes


def bucket_of(num_rows: int, sizes) -> int | None:
    """The smallest bucket holding ``num_rows`` rows (None past the largest)."""
    return min((b for b in sizes if b >= num_rows), default=None)


class _StaticBatch:
    """Fixed input buffers of one decode micro-batch of ``batch`` rows: ``inp`` is what the
    graph was captured with; ``load`` copies a real micro-batch into its first rows."""

    def __init__(self, batch: int, max_blocks: int, max_ctx: int, device):
        i32 = dict(dtype=torch.int32, device=device)
        self.filled = 0  # rows past the last batch still holding its inputs (reset at the next load)
        self.num_valid_1 = torch.full((1,), batch, **i32)
        self.token_ids_T = torch.zeros(batch, dtype=torch.int64, device=device)
        self.positions_T = torch.zeros(batch, dtype=torch.int64, device=device)
        self.slots_T = torch.full((batch,), -1, dtype=torch.int64, device=device)
        self.tables_BM = torch.zeros(batch, max_blocks, **i32)
        self.ctx_B = torch.ones(batch, **i32)
        meta = AttnMeta(self.positions_T, self.slots_T, [1] * batch, [1] * batch, [[0]] * batch)
        meta.block_tables_BM, meta.ctx_lens_B = self.tables_BM, self.ctx_B
        meta.q_starts_B, meta.q_lens_B = torch.arange(batch, **i32), torch.ones(batch, **i32)
        meta.max_q_len, meta.max_ctx_len, meta.decode_only = 1, max_ctx, True
        meta.num_valid_1 = self.num_valid_1
        self.inp = MicroBatchInput(self.token_ids_T, meta, torch.zeros(0, dtype=torch.int64, device=device))

    def before_capture(self) -> None:
        self.inp.meta.rope = None  # recomputed inside the graph from the static positions

    def all_padding(self) -> None:
        """Every row padding (the warm replay at capture: no KV written, no expert chosen)."""
        self.num_valid_1.fill_(0)

    def load(self, inp: MicroBatchInput) -> None:
        """Copy ``inp`` into the first rows; rows a larger batch before filled become padding
        again (else a replay would write their KV slots with a padding row's values)."""
        b, m = inp.num_tokens, inp.meta.block_tables_BM.shape[1]
        if self.filled > b:
            self.slots_T[b:self.filled].fill_(-1)
            self.ctx_B[b:self.filled].fill_(1)
            self.tables_BM[b:self.filled].zero_()
        self.filled = b
        self.token_ids_T[:b].copy_(inp.token_ids_T)
        self.positions_T[:b].copy_(inp.meta.positions_T)
        self.slots_T[:b].copy_(inp.meta.slot_mapping_T)
        self.tables_BM[:b, :m].copy_(inp.meta.block_tables_BM)
        self.ctx_B[:b].copy_(inp.meta.ctx_lens_B)
        self.num_valid_1.fill_(b)


class _Graph:
    def __init__(self, executor: SerialExecutor, batch: int, max_blocks: int, max_ctx: int, device, pool=None):
        self.static = _StaticBatch(batch, max_blocks, max_ctx, device)
        executor.forward(self.static.inp)  # compile and warm up outside the capture
        torch.cuda.synchronize()
        self.static.before_capture()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out_BD = executor.forward(self.static.inp)
        self.static.all_padding()
        self.graph.replay()  # the first launch uploads the graph: at start-up, not in a user's first step

    def run(self, inp: MicroBatchInput) -> torch.Tensor:
        self.static.load(inp)
        self.graph.replay()
        return self.out_BD[:inp.num_tokens]


class GraphedExecutor:
    """SerialExecutor whose single-micro-batch decode steps replay captured CUDA graphs
    (``sizes``: the batch sizes captured, ``capture_sizes``)."""

    def __init__(self, executor: SerialExecutor, sizes: list[int], max_model_len: int, block_size: int):
        self.executor, self.max_ctx = executor, max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        device = executor.attn.embed_VD.device
        self.graphs: dict[int, _Graph] = {}
        pool = None
        for b in sorted(sizes, reverse=True):  # the largest sets the shared pool's size
            self.graphs[b] = _Graph(executor, b, self.max_blocks, max_model_len, device, pool)
            pool = self.graphs[b].graph.pool()

    def run(self, inputs: list[MicroBatchInput]) -> list[torch.Tensor]:
        if len(inputs) == 1 and inputs[0].meta.decode_only and 0 < inputs[0].num_tokens <= max(self.graphs):
            inp = inputs[0]
            return [self.graphs[bucket_of(inp.num_tokens, self.graphs)].run(inp)]
        return self.executor.run(inputs)

    def forward(self, inp: MicroBatchInput) -> torch.Tensor:
        return self.executor.forward(inp)


# -- disaggregated -------------------------------------------------------------------------------

class PipelineGraphs:
    """Attention leader of a disaggregated deployment (TP 1, shared-slot transport): a decode
    step whose ``m`` micro-batches all fit a bucket pads each to that bucket (the expert groups
    are told the padded sizes) and replays the step's graph. ``executor`` stays the owner of
    the placement, the transport and the load counts; after it gets a new placement, call
    ``capture`` again (the expert side recaptures in the same step)."""

    def __init__(self, executor, sizes: list[int], max_model_len: int, block_size: int):
        self.executor, self.sizes = executor, sizes
        self.max_blocks, self.max_ctx = -(-max_model_len // block_size), max_model_len
        self.device = executor.attn.embed_VD.device
        self.capture()

    def capture(self) -> None:
        ex, m = self.executor, self.executor.m
        torch.cuda.synchronize()  # the old graphs' memory may go
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[_StaticBatch], list[torch.Tensor]]] = {}
        layers = range(ex.attn.cfg.num_layers)
        self._tables = [ex.placement.for_layer(layer).device_tables(self.device) for layer in layers]
        load_before = ex.load_LE.clone()  # the warm-up steps' routing is no load to balance
        pool = None
        for b in sorted(self.sizes, reverse=True):
            statics = [_StaticBatch(b, self.max_blocks, self.max_ctx, self.device) for _ in range(m)]
            inputs = [s.inp for s in statics]
            with _patient(ex.transport):
                ex.begin_step([b] * m)  # a real step: compiles, and the expert side takes its warm-up step
                ex.run_ops(inputs, timed=False)
                torch.cuda.synchronize()
            for s in statics:
                s.before_capture()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outs = ex.run_ops(inputs, timed=False)
            for s in statics:
                s.all_padding()
            ex.begin_step([b] * m)
            graph.replay()  # uploads the graph; the expert side replays its own
            self.graphs[b] = (graph, statics, outs)
            pool = graph.pool()
        torch.cuda.synchronize()
        ex.load_LE.copy_(load_before)
        ex.check_transport()

    def run(self, inputs: list[MicroBatchInput]) -> list[torch.Tensor]:
        b = None  # an all-empty step (an idle replica) replays the smallest graph, all padding
        if len(inputs) == self.executor.m and all(inp.meta.decode_only for inp in inputs):
            b = bucket_of(max(inp.num_tokens for inp in inputs), self.sizes)
        if b is None:
            return self.executor.run(inputs)
        graph, statics, outs = self.graphs[b]
        for s, inp in zip(statics, inputs):
            s.load(inp)
        self.executor.begin_step([b] * len(inputs))
        graph.replay()
        return [out[:inp.num_tokens] for out, inp in zip(outs, inputs)]


class ExpertGraphs:
    """Expert leader of a disaggregated deployment (TP 1, shared-slot transport): a step whose
    announced micro-batches all fit a bucket replays the graph that processes that many rows
    per sender and micro-batch (rows past a sender's count carry id -1; the GPU checks every
    count against the announced size). After the executor gets new experts, call ``capture``
    again (the attention side recaptures in the same step)."""

    def __init__(self, executor, sizes: list[int]):
        self.executor, self.sizes = executor, sizes
        self.capture()

    def capture(self) -> None:
        ex = self.executor
        torch.cuda.synchronize()  # the old graphs' memory may go
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for b in sorted(self.sizes, reverse=True):
            with _patient(ex.transport):
                ex.begin_step()  # the attention side's warm-up step
                ex.run_ops(timed=False)
                torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            ex.transport.expect_at_most(b)
            with torch.cuda.graph(graph, pool=pool):
                ex.run_ops(timed=False)
            self._replay(b, graph)  # the attention side's warm replay
            self.graphs[b] = graph
            pool = graph.pool()
        torch.cuda.synchronize()
        ex.transport.check()

    def step(self) -> None:
        announced = self.executor.begin_step()
        b = bucket_of(max(max(sizes) for sizes in announced), self.sizes)
        if b is None:  # a prefill or mixed step: more rows than any graph takes
            self.executor.run_ops()
            return
        self.graphs[b].replay()

    def _replay(self, b: int, graph: torch.cuda.CUDAGraph) -> None:
        announced = self.executor.begin_step()
        if max(max(sizes) for sizes in announced) > b:
            raise RuntimeError(f"expert graph capture: the attention side announced {announced}, more than the "
                               f"bucket of {b} rows being captured (the two sides capture different buckets)")
        graph.replay()


@contextlib.contextmanager
def _patient(transport):
    """The warm-up steps at capture wait for the other side at least ``STARTUP_TIMEOUT_S`` (it
    may still be compiling its kernels); the captured waits keep the transport's own timeout."""
    before = transport.timeout_s
    transport.timeout_s = max(before, STARTUP_TIMEOUT_S)
    try:
        yield
    finally:
        transport.timeout_s = before
