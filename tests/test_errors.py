"""Bad input gets a clear error naming the problem, and loses nothing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from afdserve import LLM, SamplingParams
from afdserve.config import ConfigError
from afdserve.core import InvalidRequest


@pytest.fixture(scope="module")
def model(tiny_models) -> str:
    return tiny_models["mixtral"]


def _copy(model: str, tmp_path) -> str:
    dst = str(tmp_path / "m")
    shutil.copytree(model, dst)
    return dst


def _edit_tensors(path: str, edit) -> None:
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


def test_missing_tensor_is_named(model, tmp_path):
    path = _copy(model, tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _edit_tensors(path, lambda t: t.pop(name))
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        LLM(path)


def test_wrong_shape_names_tensor_and_both_shapes(model, tmp_path):
    path = _copy(model, tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_tensors(path, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(ConfigError, match=r"k_proj\.weight.*\[31, 64\].*\[32, 64\]"):
        LLM(path)


def test_unsupported_architecture_lists_supported(model, tmp_path):
    path = _copy(model, tmp_path)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["LlamaForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    supported = "LlamaForCausalLM.*MixtralForCausalLM.*Qwen2MoeForCausalLM.*Qwen3MoeForCausalLM"
    with pytest.raises(ConfigError, match=supported):
        LLM(path)


def test_request_errors_are_clear_and_engine_keeps_working(model):
    with LLM(model, max_model_len=64) as llm:
        vocab = llm.config.model_config.vocab_size
        cases = [
            ([[1, vocab]], SamplingParams(), "prompt", "out of the vocabulary"),
            ([[-1, 2]], SamplingParams(), "prompt", "out of the vocabulary"),
            ([list(range(3, 67))], SamplingParams(), "prompt", "maximum context length is 64"),
            ([[]], SamplingParams(), "prompt", "at least one token"),
            ([[1, 2]], SamplingParams(stop_token_ids=[vocab + 5]), "stop_token_ids", "out of the vocabulary"),
        ]
        for prompts, params, param, msg in cases:
            with pytest.raises(InvalidRequest, match=msg) as e:
                llm.generate(prompts, params)
            assert e.value.param == param
        assert not llm.engine.has_unfinished()
        out = llm.generate([[5, 6]], SamplingParams(max_tokens=3, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                                         ("top_p", 1.5), ("n", 0), ("top_k", -2), ("logprobs", 21)])
def test_sampling_params_validation_names_field(field, value):
    with pytest.raises(InvalidRequest, match=field) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_max_model_len_above_model_limit(model):
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        LLM(model, max_model_len=10**6)


def test_kv_pool_below_one_sequence_fails_at_start(model):
    """A cache that cannot hold one sequence of max_model_len fails at start (vLLM's rule), so
    every request fits: generation stops at the context limit."""
    with pytest.raises(ConfigError, match="cannot hold one sequence"):
        LLM(model, num_kv_blocks=4)  # 64 tokens of cache, max_model_len 512
    with LLM(model, num_kv_blocks=4, max_model_len=64) as llm:
        out = llm.generate([[1] * 10], SamplingParams(max_tokens=100, ignore_eos=True))[0].outputs[0]
        assert len(out.token_ids) == 64 - 10 and out.finish_reason == "length"
