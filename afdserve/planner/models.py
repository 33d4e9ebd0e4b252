"""Model shapes for the planner: built-in presets or a Hugging Face ``config.json``.

Everything the performance model needs is a byte or FLOP count derived here. KV bytes per
token per layer are 2 (K and V) x n_kv_heads x head_dim x dtype bytes (= 4·G·Hd in bf16);
the paper's 4h/g is only right when n_heads x head_dim == hidden (false for Qwen3-MoE).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MoEShape:
    name: str
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int  # E, routed experts per layer
    top_k: int  # K
    expert_intermediate: int  # I, of one routed expert
    vocab: int
    shared_intermediate: int = 0  # total width of the shared expert(s), run on the attention side
    tie_embeddings: bool = False
    dtype_bytes: int = 2  # bf16 weights, activations and KV
    notes: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{self.name}: top_k={self.top_k} must be in 1..{self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    @property
    def attn_layer_params(self) -> int:
        """Per layer on the attention side: q/k/v/o, two norms, router, shared expert."""
        h, q, kv = self.hidden, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 2 * h + self.num_experts * h + 3 * h * self.shared_intermediate

    @property
    def attn_params_bytes(self) -> int:
        """P_a in bytes: every layer's attention side plus embedding, final norm and lm_head."""
        embed = self.vocab * self.hidden * (1 if self.tie_embeddings else 2) + self.hidden
        return (self.num_layers * self.attn_layer_params + embed) * self.dtype_bytes

    @property
    def attn_layer_bytes(self) -> int:
        return self.attn_layer_params * self.dtype_bytes

    @property
    def expert_layer_bytes(self) -> int:
        """One routed expert in one layer: gate, up and down projections."""
        return 3 * self.hidden * self.expert_intermediate * self.dtype_bytes

    @property
    def expert_bytes(self) -> int:
        """One routed expert across all layers (what an expert group stores per expert it holds)."""
        return self.num_layers * self.expert_layer_bytes

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def row_bytes(self) -> int:
        """One token's hidden row on the wire (A2E or E2A)."""
        return self.hidden * self.dtype_bytes

    @property
    def attn_flops_per_token(self) -> int:
        """Projection FLOPs of one token in one layer (independent of its context length)."""
        return 2 * self.attn_layer_params

    @property
    def attn_flops_per_ctx_token(self) -> int:
        """Score and value FLOPs of one query token per cached token in one layer."""
        return 4 * self.num_heads * self.head_dim

    @property
    def expert_flops_per_token(self) -> int:
        """FLOPs of one (token, expert) pair in one layer."""
        return 6 * self.hidden * self.expert_intermediate

    @property
    def total_params(self) -> int:
        return (self.attn_params_bytes + self.num_experts * self.expert_bytes) // self.dtype_bytes


def _preset(name: str, h: int, layers: int, heads: int, kv: int, hd: int, e: int, k: int, inter: int,
            vocab: int, notes: str = "") -> MoEShape:
    return MoEShape(name, h, layers, heads, kv, hd, e, k, inter, vocab, notes=notes)


PRESETS: dict[str, MoEShape] = {s.name: s for s in (
    _preset("Mixtral-8x7B", 4096, 32, 32, 8, 128, 8, 2, 14336, 32000),
    _preset("Mixtral-8x22B", 6144, 56, 48, 8, 128, 8, 2, 16384, 32768),
    _preset("DBRX", 6144, 40, 48, 8, 128, 16, 4, 10752, 100352),
    _preset("Qwen3-30B-A3B", 2048, 48, 32, 4, 128, 128, 8, 768, 151936),
    _preset("Qwen3-235B-A22B", 4096, 94, 64, 4, 128, 128, 8, 1536, 151936),
    # The paper gives only "317B, 32 experts, top-4" (Table 4). Assumed: DBRX's layer shape
    # (hidden 6144, 48 heads, 8 kv heads, expert intermediate 10752, vocab 100352) with twice
    # the experts and 49 layers, which makes 316.3B parameters.
    _preset("Scaled-MoE", 6144, 49, 48, 8, 128, 32, 4, 10752, 100352,
            notes="assumed DBRX layer shape, 32 experts top-4, 49 layers = 316.3B (paper: 317B)"),
)}


def shape_from_hf_config(hf: dict, name: str = "custom") -> MoEShape:
    """A shape from a Hugging Face config dict (Mixtral, Qwen2/3-MoE, DBRX, DeepSeek-style keys)."""
    ffn, attn = hf.get("ffn_config") or {}, hf.get("attn_config") or {}  # DBRX nests these
    hidden = _first(hf, "hidden_size", "d_model")
    heads = _first(hf, "num_attention_heads", "n_heads")
    experts = _first(hf, "num_local_experts", "num_experts", "n_routed_experts") or ffn.get("moe_num_experts")
    if not experts:
        raise ValueError(f"{name}: config has no expert count: not a mixture-of-experts model")
    inter = _first(hf, "moe_intermediate_size") or ffn.get("ffn_hidden_size") or hf["intermediate_size"]
    shared = hf.get("shared_expert_intermediate_size") or (hf.get("n_shared_experts") or 0) * inter
    return MoEShape(
        name=name, hidden=hidden, num_layers=_first(hf, "num_hidden_layers", "n_layers"), num_heads=heads,
        num_kv_heads=_first(hf, "num_key_value_heads") or attn.get("kv_n_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads, num_experts=experts,
        top_k=_first(hf, "num_experts_per_tok") or ffn.get("moe_top_k"), expert_intermediate=inter,
        vocab=hf["vocab_size"], shared_intermediate=shared,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def load_shape(name_or_path: str) -> MoEShape:
    """A preset by name (case-insensitive), or the shape of a model directory / config.json."""
    path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    if os.path.isfile(path):
        with open(path) as f:
            # named after the model directory, which is what profiles are keyed by
            return shape_from_hf_config(json.load(f), os.path.basename(os.path.dirname(os.path.abspath(path))))
    for key, shape in PRESETS.items():
        if key.lower() == name_or_path.lower():
            return shape
    raise ValueError(f"{name_or_path!r} is neither a model directory nor a preset; presets: {', '.join(PRESETS)}")


def _first(d: dict, *keys: str):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None
