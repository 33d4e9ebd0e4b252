"""The generic MoE decoder of every supported family, split the AFD way.

``AttentionModel`` holds what an attention replica needs (embedding, per-layer norms,
attention, router, shared expert, final norm, lm_head); ``ExpertModel`` holds the experts
placed on one expert group. Model code is single-device code: tensor parallelism enters
only as the slice of heads / intermediate columns loaded and an ``all_reduce`` callable.
Legend: T tokens, D hidden, H heads, G kv heads, Hd head dim, E experts, K top-k, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from afdserve.config import ConfigError, ModelConfig
from afdserve.layers.attention import AttnMeta, paged_attention, prepare_qkv
from afdserve.layers.basic import add_rms_norm, linear, rms_norm, rope_cos_sin
from afdserve.layers.moe import dense_mlp, expert_ffn, route
from afdserve.models.loader import Checkpoint
from afdserve.models.names import attn_names, expert_names, global_names

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class AttnHalfOut:
    """What the attention half of a layer hands to the experts and keeps for the combine."""

    residual_TD: torch.Tensor  # h + attention(h): the residual stream before the MoE
    x_TD: torch.Tensor  # post-attention-normed rows the experts consume
    topk_ids_TK: torch.Tensor
    topk_w_TK: torch.Tensor
    shared_TD: torch.Tensor | None  # gated shared-expert output (Qwen2-MoE), else None


def combine(out: AttnHalfOut, moe_TD: torch.Tensor) -> torch.Tensor:
    """Next layer's hidden state: residual + routed experts (+ shared expert), HF's order."""
    if out.shared_TD is not None:
        moe_TD = moe_TD + out.shared_TD
    return out.residual_TD + moe_TD


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """The [start, end) share of ``n`` items on ``rank`` of ``size``; sizes differ by <= 1."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class AttentionModel:
    """Attention side of every layer (tensor-parallel shard ``tp_rank`` of ``tp_size``)."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, tp_rank: int = 0, tp_size: int = 1,
                 all_reduce: AllReduce = _identity, on_tensor: Callable[[], None] = lambda: None,
                 router_skew: float = 0.0, seed: int = 0):
        self.cfg, self.all_reduce = cfg, all_reduce
        self.router_bias_LE = router_skew_bias(cfg, router_skew, seed) if router_skew else None
        self.heads, self.kv_index = _head_split(cfg, tp_rank, tp_size)
        g = {k: ckpt.get(*v) for k, v in global_names(cfg).items()}
        self.embed_VD, self.final_norm_D = g["embed_VD"], g["final_norm_D"]
        self.lm_head_VD = g.get("lm_head_VD", self.embed_VD)
        self.layers = []
        for layer in range(cfg.num_layers):
            w = {k: ckpt.get(*v) for k, v in attn_names(cfg, layer).items()}
            self.layers.append(self._shard_layer(w))
            on_tensor()
        self.scale = cfg.head_dim ** -0.5

    def _shard_layer(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hd = self.cfg.head_dim
        (h0, h1), (g0, g1) = self.heads, self.kv_index
        for name, (a, b) in (("wq", (h0, h1)), ("bq", (h0, h1)), ("wk", (g0, g1)), ("bk", (g0, g1)),
                             ("wv", (g0, g1)), ("bv", (g0, g1))):
            if name in w:
                w[name] = w[name][a * hd:b * hd].contiguous()
        w["wo"] = w["wo"][:, h0 * hd:h1 * hd].contiguous()
        w["wqkv"] = torch.cat([w.pop("wq"), w.pop("wk"), w.pop("wv")])  # one GEMM for q, k and v
        if "bq" in w:
            w["bqkv"] = torch.cat([w.pop("bq"), w.pop("bk"), w.pop("bv")])
        if "shared_gate_proj" in w:
            w["shared_w13"] = torch.cat([w.pop("shared_gate_proj"), w.pop("shared_up_proj")])
        return w

    @property
    def num_local_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def num_local_kv_heads(self) -> int:
        return self.kv_index[1] - self.kv_index[0]

    def embed(self, token_ids_T: torch.Tensor) -> torch.Tensor:
        return self.embed_VD[token_ids_T]

    def attention_half(self, layer: int, h_TD: torch.Tensor, meta: AttnMeta,
                       kv: tuple[torch.Tensor, torch.Tensor]) -> AttnHalfOut:
        """norm -> attention (writes this batch's KV) -> +residual -> norm -> router."""
        w, cfg = self.layers[layer], self.cfg
        x_TD = rms_norm(h_TD, w["input_norm_D"], cfg.rms_norm_eps)
        attn_TD = self.all_reduce(self._attention(w, x_TD, meta, kv))
        x_TD, residual_TD = add_rms_norm(h_TD, attn_TD, w["post_norm_D"], cfg.rms_norm_eps)
        bias_E = None if self.router_bias_LE is None else self.router_bias_LE[layer]
        topk_ids_TK, topk_w_TK = route(x_TD, w["gate_ED"], cfg.top_k, cfg.norm_topk_prob, bias_E, meta.num_valid_1)
        shared_TD = None
        if "shared_w13" in w:
            gate_T1 = torch.sigmoid(linear(x_TD, w["shared_expert_gate"]))
            shared_TD = gate_T1 * dense_mlp(x_TD, w["shared_w13"], w["shared_down_proj"])
        return AttnHalfOut(residual_TD, x_TD, topk_ids_TK, topk_w_TK, shared_TD)

    def _attention(self, w: dict[str, torch.Tensor], x_TD: torch.Tensor, meta: AttnMeta,
                   kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t, hd, h, g = x_TD.shape[0], self.cfg.head_dim, self.num_local_heads, self.num_local_kv_heads
        qkv_TF = linear(x_TD, w["wqkv"], w.get("bqkv"))
        if meta.rope is None:  # once per forward, not once per layer
            meta.rope = rope_cos_sin(meta.positions_T, hd, self.cfg.rope_theta)
        q = prepare_qkv(qkv_TF, h, g, w.get("q_norm"), w.get("k_norm"), self.cfg.rms_norm_eps, meta.rope, *kv,
                        meta.slot_mapping_T)
        o = paged_attention(q, kv[0], kv[1], meta, self.scale)
        return linear(o.reshape(t, h * hd), w["wo"])

    def logits(self, h_TD: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head, in float32 for sampling."""
        x_TD = rms_norm(h_TD, self.final_norm_D, self.cfg.rms_norm_eps)
        return linear(x_TD, self.lm_head_VD).float()


def router_skew_bias(cfg: ModelConfig, exponent: float, seed: int) -> torch.Tensor:
    """[L, E] router-logit bias making expert popularity Zipf-like (a benchmark/test knob):
    adding log(p_e) to the logits multiplies expert e's routing probability by p_e, with
    p_e proportional to rank^-exponent over a random expert order per layer."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, cfg.num_experts + 1, dtype=torch.float32)
    bias = torch.empty(cfg.num_layers, cfg.num_experts)
    for layer in range(cfg.num_layers):
        bias[layer, torch.randperm(cfg.num_experts, generator=gen)] = -exponent * ranks.log()
    return bias


def _head_split(cfg: ModelConfig, rank: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Query-head range and kv-head range of a TP rank (kv heads replicate when G < tp)."""
    if cfg.num_heads % size:
        raise ConfigError(f"attention tensor parallel size {size} must divide num_attention_heads="
                          f"{cfg.num_heads}")
    per = cfg.num_heads // size
    heads = (rank * per, (rank + 1) * per)
    g = cfg.num_kv_heads
    if g >= size:
        if g % size:
            raise ConfigError(f"attention tensor parallel size {size} must divide num_key_value_heads={g}")
        kv = (rank * g // size, (rank + 1) * g // size)
    else:
        kv_idx = rank * g // size
        kv = (kv_idx, kv_idx + 1)
    return heads, kv


class ExpertModel:
    """The experts held by one expert group, every layer, as stacked local slots.

    ``experts[layer][s]`` is the global expert id in local slot s; a TP rank holds the columns
    [i0, i1) of the intermediate dimension and ``all_reduce`` sums the partial outputs.
    """

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, experts_per_layer: Sequence[Sequence[int]],
                 tp_rank: int = 0, tp_size: int = 1, all_reduce: AllReduce = _identity,
                 on_tensor: Callable[[], None] = lambda: None):
        self.cfg, self.all_reduce = cfg, all_reduce
        self.experts = [list(e) for e in experts_per_layer]
        i0, i1 = shard_range(cfg.moe_intermediate_size, tp_rank, tp_size)
        self.w13_EFD: list[torch.Tensor] = []
        self.w2_EDI: list[torch.Tensor] = []
        for layer in range(cfg.num_layers):
            w13, w2 = [], []
            for e in self.experts[layer]:
                n = {k: ckpt.get(*v) for k, v in expert_names(cfg, layer, e).items()}
                w13.append(torch.cat([n["gate"][i0:i1], n["up"][i0:i1]]))
                w2.append(n["down"][:, i0:i1])
            self.w13_EFD.append(torch.stack(w13) if w13 else torch.empty(0))
            self.w2_EDI.append(torch.stack(w2) if w2 else torch.empty(0))
            on_tensor()

    def expert_half(self, layer: int, x_TD: torch.Tensor, local_ids_TK: torch.Tensor,
                    topk_w_TK: torch.Tensor) -> torch.Tensor:
        """Sum of each row's experts held here (ids are local slots, -1 = elsewhere)."""
        y_TD = expert_ffn(x_TD, local_ids_TK, topk_w_TK, self.w13_EFD[layer], self.w2_EDI[layer])
        return self.all_reduce(y_TD)
