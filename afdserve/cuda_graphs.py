"""CUDA graphs for decode steps: the whole forward of a decode micro-batch (every layer) is
captured once per batch-size bucket and replayed, so Python and kernel-launch overhead stop
setting the step time. Prefill and mixed steps run eagerly.

Inputs are copied into static buffers first; padding rows write no KV (slot -1), attend to
one cached token of block 0, choose no expert (so they read no expert weights), and their
outputs are dropped. All graphs share one memory pool (captured largest first). The decode attention kernel is
captured for the longest context (``max_model_len``) and masks by each row's context length.
Legend: B padded batch, M blocks per sequence, T tokens, D hidden."""

from __future__ import annotations

import torch

from afdserve.layers.attention import AttnMeta
from afdserve.runner import MicroBatchInput, SerialExecutor


def buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    return [b for b in sizes if b < max_batch] + [max_batch]


class _Graph:
    def __init__(self, executor: SerialExecutor, batch: int, max_blocks: int, max_ctx: int, device, pool=None):
        i32 = dict(dtype=torch.int32, device=device)
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
        inp = MicroBatchInput(self.token_ids_T, meta, torch.zeros(0, dtype=torch.int64, device=device))
        executor.forward(inp)  # compile and warm up outside the capture
        torch.cuda.synchronize()
        meta.rope = None  # recomputed inside the graph from the static positions
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out_BD = executor.forward(inp)
        self.num_valid_1.fill_(0)  # all rows padding: no KV written, no expert chosen
        self.graph.replay()  # the first launch uploads the graph: at start-up, not in a user's first step

    def run(self, inp: MicroBatchInput) -> torch.Tensor:
        b, m = inp.num_tokens, inp.meta.block_tables_BM.shape[1]
        self.token_ids_T[:b].copy_(inp.token_ids_T)
        self.positions_T[:b].copy_(inp.meta.positions_T)
        self.slots_T[:b].copy_(inp.meta.slot_mapping_T)
        self.tables_BM[:b, :m].copy_(inp.meta.block_tables_BM)
        self.ctx_B[:b].copy_(inp.meta.ctx_lens_B)
        self.num_valid_1.fill_(b)
        self.graph.replay()
        self._reset_padding(b)
        return self.out_BD[:b]

    def _reset_padding(self, b: int) -> None:
        """Rows past ``b`` must stay harmless for the next replay of a smaller batch."""
        self.slots_T[b:].fill_(-1)
        self.ctx_B[b:].fill_(1)
        self.tables_BM[b:].zero_()


class GraphedExecutor:
    """SerialExecutor whose single-micro-batch decode steps replay captured CUDA graphs."""

    def __init__(self, executor: SerialExecutor, max_batch: int, max_model_len: int, block_size: int):
        self.executor, self.max_ctx = executor, max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        device = executor.attn.embed_VD.device
        self.graphs: dict[int, _Graph] = {}
        pool = None
        for b in sorted(buckets(max_batch), reverse=True):  # the largest sets the shared pool's size
            self.graphs[b] = _Graph(executor, b, self.max_blocks, max_model_len, device, pool)
            pool = self.graphs[b].graph.pool()

    def run(self, inputs: list[MicroBatchInput]) -> list[torch.Tensor]:
        if len(inputs) == 1 and inputs[0].meta.decode_only and 0 < inputs[0].num_tokens <= max(self.graphs):
            inp = inputs[0]
            bucket = min(b for b in self.graphs if b >= inp.num_tokens)
            return [self.graphs[bucket].run(inp)]
        return self.executor.run(inputs)

    def forward(self, inp: MicroBatchInput) -> torch.Tensor:
        return self.executor.forward(inp)
