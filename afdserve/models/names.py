"""Hub tensor names of each family, mapped to our fields with their expected shapes.

One dict literal per family and role; the generic model in ``moe_model.py`` reads the
fields. Shapes are [out, in] as in the checkpoints.
"""

from __future__ import annotations

from afdserve.config import ModelConfig

Shape = tuple[int, ...]


def global_names(cfg: ModelConfig) -> dict[str, tuple[str, Shape]]:
    names = {
        "embed_VD": ("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)),
        "final_norm_D": ("model.norm.weight", (cfg.hidden_size,)),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head_VD"] = ("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    return names


def attn_names(cfg: ModelConfig, layer: int) -> dict[str, tuple[str, Shape]]:
    """The attention half of one layer: norms, q/k/v/o, router (and shared expert)."""
    p, d = f"model.layers.{layer}.", cfg.hidden_size
    moe = p + ("block_sparse_moe." if cfg.family == "mixtral" else "mlp.")
    names = {
        "input_norm_D": (p + "input_layernorm.weight", (d,)),
        "post_norm_D": (p + "post_attention_layernorm.weight", (d,)),
        "wq": (p + "self_attn.q_proj.weight", (cfg.q_size, d)),
        "wk": (p + "self_attn.k_proj.weight", (cfg.kv_size, d)),
        "wv": (p + "self_attn.v_proj.weight", (cfg.kv_size, d)),
        "wo": (p + "self_attn.o_proj.weight", (d, cfg.q_size)),
        "gate_ED": (moe + "gate.weight", (cfg.num_experts, d)),
    }
    if cfg.qkv_bias:
        names |= {
            "bq": (p + "self_attn.q_proj.bias", (cfg.q_size,)),
            "bk": (p + "self_attn.k_proj.bias", (cfg.kv_size,)),
            "bv": (p + "self_attn.v_proj.bias", (cfg.kv_size,)),
        }
    if cfg.qk_norm:
        names |= {
            "q_norm": (p + "self_attn.q_norm.weight", (cfg.head_dim,)),
            "k_norm": (p + "self_attn.k_norm.weight", (cfg.head_dim,)),
        }
    if cfg.shared_expert_intermediate_size:
        i = cfg.shared_expert_intermediate_size
        names |= {
            "shared_gate_proj": (moe + "shared_expert.gate_proj.weight", (i, d)),
            "shared_up_proj": (moe + "shared_expert.up_proj.weight", (i, d)),
            "shared_down_proj": (moe + "shared_expert.down_proj.weight", (d, i)),
            "shared_expert_gate": (moe + "shared_expert_gate.weight", (1, d)),
        }
    return names


def expert_names(cfg: ModelConfig, layer: int, expert: int) -> dict[str, tuple[str, Shape]]:
    """One expert of one layer as (gate, up, down) projections."""
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    if cfg.family == "mixtral":
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        gate, up, down = p + "w1.weight", p + "w3.weight", p + "w2.weight"
    else:
        p = f"model.layers.{layer}.mlp.experts.{expert}."
        gate, up, down = p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"
    return {"gate": (gate, (i, d)), "up": (up, (i, d)), "down": (down, (d, i))}
