"""Engine behaviour on a tiny model: batch invariance, chunked prefill, preemption, stops."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.core import InvalidRequest

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_models) -> str:
    return tiny_models["qwen3_moe"]


def _prompts(n: int, vocab: int = 300) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    lens = [1, 3, 9, 16, 17, 23, 35, 50][:n]
    return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lens]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_batch_invariance_alone_vs_batch_of_8(model):
    prompts = _prompts(8)
    with LLM(model) as llm:
        alone = [_tokens(llm.generate([p], GREEDY))[0] for p in prompts]
        batched = _tokens(llm.generate(prompts, GREEDY))
    assert batched == alone


def test_chunked_prefill_and_preemption_keep_tokens(model):
    prompts = _prompts(8)
    with LLM(model) as llm:
        ref = _tokens(llm.generate(prompts, GREEDY))
    # budget below the longest prompt forces chunked prefill; 12 blocks of 16 cannot hold
    # 8 sequences of up to 74 tokens, so requests are preempted and recomputed
    with LLM(model, max_num_batched_tokens=20, num_kv_blocks=12, max_model_len=192) as llm:
        got = _tokens(llm.generate(prompts, GREEDY))
        assert llm.engine.scheduler.num_preemptions > 0
    assert got == ref


def test_max_tokens_and_length_finish(model):
    with LLM(model) as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_stop_token_ids_and_eos(model):
    with LLM(model) as llm:
        free = llm.generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids
        stop_at = free[3]
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                         stop_token_ids=[stop_at]))[0].outputs[0]
        assert out.token_ids == free[: free.index(stop_at) + 1]
        assert out.finish_reason == "stop" and out.stop_reason == stop_at
        llm.engine.eos_ids = {stop_at}  # the same token as EOS, honoured unless ignore_eos
        eos = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
        assert eos.token_ids == out.token_ids and eos.finish_reason == "stop"


def test_stop_string_cuts_text(model):
    with LLM(model) as llm:
        free = llm.generate("Hello world", GREEDY)[0].outputs[0]
        text = free.text
        stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip()
                    and "\ufffd" not in text[i:i + 2])
        out = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                         stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert len(out.token_ids) <= len(free.token_ids)


def test_seeded_sampling_is_reproducible_and_differs_by_seed(model):
    p = dict(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, ignore_eos=True)
    with LLM(model) as llm:
        a = _tokens(llm.generate(["Hi"] * 2, SamplingParams(seed=11, **p)))
        b = _tokens(llm.generate(["Hi"], SamplingParams(seed=11, **p)))
        c = _tokens(llm.generate(["Hi"], SamplingParams(seed=12, **p)))
    assert a[0] == a[1] == b[0]
    assert c[0] != b[0]


def test_n_samples_and_text_prompts(model):
    with LLM(model) as llm:
        out = llm.generate("Hello", SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True))
    assert len(out) == 1 and [o.index for o in out[0].outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in out[0].outputs)
    assert len({tuple(o.token_ids) for o in out[0].outputs}) > 1


def test_dummy_load_format_needs_only_config_json(model, tmp_path):
    import shutil

    shutil.copy(f"{model}/config.json", tmp_path / "config.json")  # no weights, no tokenizer
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(str(tmp_path), load_format="dummy", seed=3) as llm:
        a = llm.generate([[5, 6, 7]], params)[0].outputs[0]
        with pytest.raises(Exception, match="token ids"):
            llm.generate("text needs a tokenizer", params)
    with LLM(str(tmp_path), load_format="dummy", seed=3) as llm:
        b = llm.generate([[5, 6, 7]], params)[0].outputs[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6 and a.text == ""


def test_benchmark_skip_prefill_starts_decoding_at_once(model):
    """Benchmarks: with benchmark_skip_prefill a 100-token prompt is not prefilled (budget 16
    tokens a step), so every request gets a token from its first step; the KV blocks of the
    whole context are still held."""
    with LLM(model, max_num_batched_tokens=16, benchmark_skip_prefill=True) as llm:
        engine = llm.engine
        reqs = [engine.add_request(str(i), list(range(3, 103)), SamplingParams(max_tokens=4, ignore_eos=True))
                for i in range(3)]
        engine.step()
        assert [len(r.output_token_ids) for r in reqs] == [1, 1, 1]
        assert all(len(r.block_ids) * engine.scheduler.block_size >= 101 for r in reqs)
        while engine.has_unfinished():
            engine.step()
        assert engine.num_steps == 4


@pytest.mark.parametrize("options,match", [
    (dict(layout="colocated", attn_groups=2, attn_tp=2), "tensor parallelism"),
    (dict(layout="colocated", attn_groups=2, expert_groups=3), "expert_groups"),
    (dict(layout="colocated", attn_groups=2, enable_eplb=True), "enable_eplb"),
    (dict(layout="colocated", attn_groups=2, expert_tp=2), "tensor parallelism"),
    (dict(layout="colocated", attn_groups=2, micro_batches=2), "one micro-batch"),
    (dict(layout="colocated", attn_groups=99), "data-parallel-size"),
])
def test_colocated_layout_rejects_what_it_cannot_run(model, options, match):
    from afdserve.config import ConfigError, make_config

    with pytest.raises(ConfigError, match=match):
        make_config(model, **options)


def test_kv_budget_from_gpu_memory_utilization(model):
    from afdserve.build import CPU_KV_CACHE_GB, gpu_kv_budget_bytes, kv_budget_bytes
    from afdserve.config import ConfigError, make_config

    gib = 2**30
    # 80 GiB GPU, 30 GiB in use after the weights, 90%: 72 - 30 - 3.2 (4% reserve) GiB
    assert gpu_kv_budget_bytes(80 * gib, 50 * gib, 0.9) == int(0.9 * 80 * gib) - 30 * gib - int(0.04 * 80 * gib)
    assert gpu_kv_budget_bytes(16 * gib, 15 * gib, 0.9) == int(0.9 * 16 * gib) - gib - 2 * gib  # 2 GiB floor
    assert kv_budget_bytes(make_config(model), torch.device("cpu")) == int(CPU_KV_CACHE_GB * gib)
    assert kv_budget_bytes(make_config(model, kv_cache_memory_gb=0.25), torch.device("cpu")) == gib // 4
    for bad in (dict(gpu_memory_utilization=0.0), dict(gpu_memory_utilization=1.5), dict(kv_cache_memory_gb=-1),
                dict(dist_timeout_s=0)):
        with pytest.raises(ConfigError):
            make_config(model, **bad)


def test_vllm_offline_api_shapes(model):
    """What vLLM scripts call: prompt dicts, LLM.chat (one conversation or several), use_tqdm,
    get_tokenizer, and vLLM's constructor keywords."""
    from afdserve.config import ConfigError, vllm_parallel_options

    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    conv = [{"role": "user", "content": "Hello there"}]
    with LLM(model, tensor_parallel_size=1, trust_remote_code=True, tokenizer=model) as llm:
        tok = llm.get_tokenizer()
        ids = tok.encode("Hello world")
        plain = [o.outputs[0].token_ids for o in llm.generate(["Hello world", ids], greedy)]
        dicts = llm.generate([{"prompt": "Hello world"}, {"prompt_token_ids": ids}], greedy, use_tqdm=True)
        assert [o.outputs[0].token_ids for o in dicts] == plain and dicts[0].prompt == "Hello world"
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        want = llm.generate([tok.encode(text, add_special_tokens=False)], greedy)[0].outputs[0].token_ids
        one = llm.chat(conv, greedy)
        two = llm.chat([conv, conv + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]],
                       greedy)
        assert one[0].outputs[0].token_ids == want == two[0].outputs[0].token_ids and len(two) == 2
        with pytest.raises(InvalidRequest, match="prompt dict"):
            llm.generate({"text": "x"}, greedy)
    with pytest.raises(ConfigError, match="tokenizer"):
        LLM(model, tokenizer="other/tokenizer")
    assert vllm_parallel_options(dict(tensor_parallel_size=2, data_parallel_size=3)) == \
        dict(attn_tp=2, expert_tp=2, attn_groups=3)
    assert vllm_parallel_options(dict(data_parallel_size=2, enable_expert_parallel=True))["layout"] == "colocated"
    with pytest.raises(ConfigError):
        vllm_parallel_options(dict(tensor_parallel_size=2, attn_tp=2))
