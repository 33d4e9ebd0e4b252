"""Attention-side model runner: a step's micro-batches become tensors, an executor runs
the layers, and the rows that sample become logits.

``SerialExecutor`` runs every layer of every micro-batch in one process with all experts
local: the single-process engine, and the reference the pipelined executor is tested
against. Legend: T tokens, D hidden, V vocab, S rows that sample."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    # prompt logprobs: (row, request, position p) whose hidden state predicts prompt token p + 1
    prompt_lp_rows: list[tuple[int, Request, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids_T.numel())

    def for_peers(self) -> MicroBatchInput:
        """What the tensor-parallel peers need (no requests: they only run the layers)."""
        return replace(self, pending_rows=[], prompt_lp_rows=[])


class Executor(Protocol):
    def run(self, inputs: list[MicroBatchInput]) -> list[torch.Tensor]:
        """Final hidden states [T, D] of every micro-batch (all layers done)."""
        ...


def prepare(chunks: list[ScheduledChunk], block_size: int, device: torch.device | str) -> MicroBatchInput:
    """Token ids, positions, KV slots and block tables of one micro-batch (one host-to-device copy)."""
    ids, pos, slots, sample_rows, pending, prompt_lp = [], [], [], [], [], []
    for c in chunks:
        req = c.request
        positions = range(c.start, c.start + c.num_new)
        if req.params.prompt_logprobs is not None:
            prompt_lp += [(len(ids) + i, req, p) for i, p in enumerate(positions)
                          if len(req.prompt_logprobs) <= p < req.num_prompt_tokens - 1]
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
    return MicroBatchInput(packed[:t], meta, packed[3 * t:3 * t + s], pending, prompt_lp)


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


PROMPT_LOGPROB_ROWS = 256  # rows of [rows, V] float32 logits at a time (152k vocab: 156 MB)


def fill_prompt_logprobs(attn: AttentionModel, inputs: list[MicroBatchInput], hidden: list[torch.Tensor]) -> None:
    """Requests that ask for prompt logprobs get those of the prompt tokens this step computed
    (the logprob of each next prompt token under the model and its rank, plus the top ``prompt_logprobs``),
    in prompt order; a recomputation after preemption adds nothing twice. Reads them on the host."""
    rows = [(h_TD[row], req, p) for inp, h_TD in zip(inputs, hidden) for row, req, p in inp.prompt_lp_rows]
    for at in range(0, len(rows), PROMPT_LOGPROB_ROWS):
        part = rows[at:at + PROMPT_LOGPROB_ROWS]
        lp_RV = torch.log_softmax(attn.logits(torch.stack([h for h, _, _ in part])), dim=-1)
        want_R1 = to_device([req.prompt_token_ids[p + 1] for _, req, p in part], torch.int64, lp_RV.device)[:, None]
        top_lp, top_ids = lp_RV.topk(max(1, max(req.params.prompt_logprobs for _, req, _ in part)), dim=-1)
        token_lp_R1 = lp_RV.gather(1, want_R1)
        rank = ((lp_RV > token_lp_R1).sum(dim=-1) + 1).tolist()
        token_lp, top_lp, top_ids = token_lp_R1[:, 0].tolist(), top_lp.tolist(), top_ids.tolist()
        for r, (_, req, p) in enumerate(part):
            if len(req.prompt_logprobs) == p:
                k = req.params.prompt_logprobs
                entry = {req.prompt_token_ids[p + 1]: token_lp[r]}
                req.prompt_logprobs.append(entry | {t: v for t, v in zip(top_ids[r][:k], top_lp[r][:k])})
                req.prompt_logprob_ranks.append(rank[r])
