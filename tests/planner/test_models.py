from __future__ import annotations

import json

import pytest

from afdserve.planner.models import PRESETS, load_shape, shape_from_hf_config


@pytest.mark.parametrize("name,billions", [("Mixtral-8x7B", 46.7), ("Mixtral-8x22B", 140.6), ("DBRX", 131.6),
                                           ("Qwen3-30B-A3B", 30.5), ("Qwen3-235B-A22B", 235.1),
                                           ("Scaled-MoE", 317)])
def test_preset_parameter_counts_match_the_published_sizes(name, billions):
    assert PRESETS[name].total_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_kv_bytes_use_kv_heads_times_head_dim():
    qwen = PRESETS["Qwen3-30B-A3B"]  # 32 heads x 128 = 4096 != hidden 2048
    assert qwen.kv_bytes_per_token_layer == 2 * 4 * 128 * 2
    paper_4h_over_g = 4 * qwen.hidden / (qwen.num_heads // qwen.num_kv_heads)
    assert qwen.kv_bytes_per_token_layer == 2 * paper_4h_over_g  # the paper's formula is off by 2x here
    mixtral = PRESETS["Mixtral-8x22B"]  # heads x head_dim == hidden: both agree
    assert mixtral.kv_bytes_per_token_layer == 4 * mixtral.hidden / (mixtral.num_heads // mixtral.num_kv_heads)


def test_bytes_of_attention_and_one_expert():
    s = PRESETS["Mixtral-8x22B"]
    assert s.expert_layer_bytes == 3 * 6144 * 16384 * 2
    per_layer = 6144 * 6144 * 2 + 2 * 6144 * 1024 + 2 * 6144 + 8 * 6144
    assert s.attn_params_bytes == 2 * (56 * per_layer + 2 * 32768 * 6144 + 6144)


HF = {
    "mixtral": {"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
                "num_experts_per_tok": 2, "intermediate_size": 96, "vocab_size": 300},
    "qwen2_moe": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                  "intermediate_size": 128, "shared_expert_intermediate_size": 96, "vocab_size": 300},
    "dbrx": {"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 300,
             "attn_config": {"kv_n_heads": 2}, "ffn_config": {"moe_num_experts": 8, "moe_top_k": 2,
                                                              "ffn_hidden_size": 96}},
}


@pytest.mark.parametrize("family", sorted(HF))
def test_hf_configs(family, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF[family]))
    s = load_shape(str(tmp_path))
    assert (s.hidden, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.num_experts, s.top_k) == \
        (64, 2, 4, 2, 16, 8, 2)
    assert s.expert_intermediate == (48 if family == "qwen2_moe" else 96)
    assert s.shared_intermediate == (96 if family == "qwen2_moe" else 0)
    assert load_shape(str(tmp_path / "config.json")) == s


def test_presets_by_name_and_errors():
    assert load_shape("mixtral-8x22b") is PRESETS["Mixtral-8x22B"]
    with pytest.raises(ValueError, match="presets"):
        load_shape("no-such-model")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        shape_from_hf_config({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                              "intermediate_size": 16, "vocab_size": 10})
