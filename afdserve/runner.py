"""Attention-side model runner: a step's micro-batches become tensors, an executor runs
the layers, and the rows that sample become logits.

``SerialExecutor`` runs every layer of every micro-batch in one process with all experts
local: the single-process engine, and the reference the pipelined executor is tested
against. Legend: T tokens, D hidden, V vocab, S rows that sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from afdserve.core import Request, ScheduledChunk
from afdserve.layers.attention import AttnMeta, add_device_fields
from afdserve.layers.basic import to_device
from afdserve.models.moe_model import AttentionModel, ExpertModel, combine

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class MicroBatchInput:
    token_ids_T: torch.Tensor
    meta: AttnMeta
    sample_rows_S: torch.Tensor  # rows (last token of a chunk) whose logits are sampled
    # async scheduling: (row, request) whose input token is still on the GPU (id 0 until filled in)
    pending_rows: list[tuple[int, Request]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids_T.numel())


class Executor(Protocol):
    def run(self, inputs: list[MicroBatchInput]) -> list[torch.Tensor]:
        """Final hidden states [T, D] of every micro-batch (all layers done)."""
        ...


def prepare(chunks: list[ScheduledChunk], block_size: int, device: torch.device | str) -> MicroBatchInput:
    """Token ids, positions, KV slots and block tables of one micro-batch (one host-to-device copy)."""
    ids, pos, slots, sample_rows, pending = [], [], [], [], []
    for c in chunks:
        req = c.request
        positions = range(c.start, c.start + c.num_new)
        known = req.all_token_ids[c.start:c.start + c.num_new]
        if len(known) < c.num_new:  # the last one is a pending token (async scheduling)
            pending.append((len(ids) + len(known), req))
            known.append(0)
        ids += known
        pos += positions
        slots += [req.block_ids[p // block_size] * block_size + p % block_size for p in positions]
        if c.samples:
            sample_rows.append(len(ids) - 1)
    t, s = len(ids), len(sample_rows)
    packed = to_device(ids + pos + slots + sample_rows, torch.int64, device)
    meta = AttnMeta(positions_T=packed[t:2 * t], slot_mapping_T=packed[2 * t:3 * t],
                    q_lens=[c.num_new for c in chunks], ctx_lens=[c.start + c.num_new for c in chunks],
                    block_tables=[c.request.block_ids for c in chunks])
    if torch.device(device).type == "cuda":
        add_device_fields(meta, device)
    return MicroBatchInput(packed[:t], meta, packed[3 * t:3 * t + s], pending)


class SerialExecutor:
    """All layers, micro-batch after micro-batch, experts in-process."""

    def __init__(self, attn: AttentionModel, experts: ExpertModel, kv: KVCache):
        self.attn, self.experts, self.kv = attn, experts, kv

    def run(self, inputs: list[MicroBatchInput]) -> list[torch.Tensor]:
        return [self.forward(inp) for inp in inputs]

    def forward(self, inp: MicroBatchInput) -> torch.Tensor:
        h_TD = self.attn.embed(inp.token_ids_T)
        for layer in range(self.attn.cfg.num_layers):
            out = self.attn.attention_half(layer, h_TD, inp.meta, self.kv[layer])
            h_TD = combine(out, self.experts.expert_half(layer, out.x_TD, out.topk_ids_TK, out.topk_w_TK))
        return h_TD


def sample_logits(attn: AttentionModel, inputs: list[MicroBatchInput], hidden: list[torch.Tensor]) -> torch.Tensor:
    """Logits [S, V] of the sampling rows, micro-batch by micro-batch in order."""
    rows = [h_TD[inp.sample_rows_S] for inp, h_TD in zip(inputs, hidden)]
    h_SD = torch.cat(rows) if rows else hidden[0][:0]
    return attn.logits(h_SD)
