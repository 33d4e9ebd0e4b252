"""The engine on CUDA in bf16 (every GPU kernel on the request path) against the CPU in float32."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams
from tests.kernels.gpu_check import rel_err

pytestmark = pytest.mark.gpu

PROMPT_LENS = [1, 5, 16, 17, 40]  # up to more than one KV block (16)


def _prefill_logits(engine, prompt: list[int], device: str) -> torch.Tensor:
    """All-position logits of one prompt through the engine's runner (float32, on the CPU)."""
    from afdserve.core import ScheduledChunk
    from afdserve.runner import prepare

    req = engine.add_request("probe", prompt, SamplingParams(max_tokens=1))
    engine.scheduler.schedule()  # admits the request and reserves its blocks
    inp = prepare([ScheduledChunk(req, 0, len(prompt))], engine.scheduler.block_size, device)
    h_TD = engine.executor.forward(inp)
    engine.abort_request("probe")
    return engine.attn.logits(h_TD).float().cpu()


# (dtype, bound on prefill logits' relative error, bound on |logprob difference| in decode).
# float32 runs every kernel in full precision (the "ieee" dot), so the bounds are tight. In
# bf16 the rounding alone flips near-tied router choices of these random tiny models (seen:
# logprobs 1-2 nats apart after a flip), so only prefill is compared there, loosely: a wiring
# error gives errors near 1. Each kernel is held to 2e-2 in bf16 in its own test.
DTYPES = [("float32", 2e-3, 2e-2), ("bfloat16", 0.25, None)]


@pytest.mark.parametrize("dtype,logit_tol,logprob_tol", DTYPES)
def test_engine_on_gpu_matches_cpu(dev, tiny_models, family, dtype, logit_tol, logprob_tol):
    device, _ = dev
    if device != "cuda":
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(3)
    with LLM(tiny_models[family]) as cpu, LLM(tiny_models[family], device="cuda", dtype=dtype) as gpu:
        vocab = cpu.engine.attn.embed_VD.shape[0]
        prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]
        for prompt in prompts:  # prefill: the varlen kernel, router, experts
            with torch.no_grad():
                ref = _prefill_logits(cpu.engine, prompt, "cpu")
                out = _prefill_logits(gpu.engine, prompt, "cuda")
            assert rel_err(out, ref) < logit_tol, f"{family}, prompt of {len(prompt)}"
        if logprob_tol is None:
            return
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
        outs = gpu.generate(prompts, params)  # decode: the split-KV kernel in batches of 5
        for prompt, res in zip(prompts, outs):
            tokens, lps = res.outputs[0].token_ids, res.outputs[0].logprobs
            with torch.no_grad():
                ref = torch.log_softmax(_prefill_logits(cpu.engine, prompt + tokens[:-1], "cpu"), -1)
            for j, top in enumerate(lps):
                want = ref[len(prompt) - 1 + j][torch.tensor(list(top.keys()))]
                diff = (torch.tensor(list(top.values())) - want).abs().max()
                assert diff < logprob_tol, f"{family}, prompt of {len(prompt)}, step {j}: {diff:.3f}"


def test_kv_cache_fills_gpu_memory_utilization(tiny_models):
    """Without kv_cache_memory_gb, the KV cache takes what gpu_memory_utilization leaves after
    the weights (less the activation reserve), and no more."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from afdserve.build import gpu_kv_budget_bytes
    from afdserve.kv_cache import kv_bytes_per_block

    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    util = min(0.95, (total - free) / total + 0.2)  # about 20% of the GPU for this test
    with LLM(tiny_models["mixtral"], device="cuda", dtype="bfloat16", max_num_seqs=10**6,
             gpu_memory_utilization=util, enforce_eager=True) as llm:
        mc, blocks = llm.config.model_config, llm.engine.scheduler.blocks.num_blocks
        per_block = kv_bytes_per_block(mc.num_layers, 16, mc.num_kv_heads, mc.head_dim, torch.bfloat16)
        assert blocks * per_block <= gpu_kv_budget_bytes(total, free, util) + per_block
        assert blocks * per_block >= 0.5 * gpu_kv_budget_bytes(total, free, util)  # weights of a tiny model are small
        assert torch.cuda.memory_reserved() <= util * total


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_sampling_params_on_gpu(tiny_models, async_scheduling):
    """Every sampling option runs on the GPU engine, synchronously and with async scheduling
    (seeds draw from their own GPU generators; penalties and logprobs run on the GPU): seeded
    sampling is reproducible, the others finish with their tokens,
    allowed_token_ids hold, and a penalty that overflows the logits still samples."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    prompts = [[5, 6, 7], [9, 10, 11, 12], [3] * 20, [40, 41], [8, 9], [8, 9]]
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, repetition_penalty=1.2,
                             prompt_logprobs=2),
              SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True, presence_penalty=0.5),
              SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, allowed_token_ids=[11, 12, 13]),
              SamplingParams(temperature=0.5, max_tokens=12, ignore_eos=True, repetition_penalty=1e-38)]
    with LLM(tiny_models["qwen3_moe"], device="cuda", dtype="float32", async_scheduling=async_scheduling) as llm:
        outs = llm.generate(prompts, params)
        first = [o.outputs[0] for o in outs]
        again = llm.generate([prompts[1]], params[1])[0].outputs[0]
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in first)
    assert again.token_ids == first[1].token_ids  # the seed decides the draws
    assert len(first[2].logprobs) == 12
    assert len(outs[2].prompt_logprobs) == 20 and all(len(e) in (2, 3) for e in outs[2].prompt_logprobs[1:])
    assert set(first[4].token_ids) <= {11, 12, 13}  # allowed_token_ids; [5]: an overflowing penalty still samples


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prefix_caching_on_gpu(tiny_models, async_scheduling):
    """Prompts sharing a prefix, first one by one then all at once (prefill from cached blocks,
    CUDA-graph decode): the tokens of the engine without caching."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tests.test_prefix_caching import GREEDY, _workload

    prompts = _workload()
    opts = dict(device="cuda", dtype="float32", async_scheduling=async_scheduling)
    with LLM(tiny_models["qwen3_moe"], enable_prefix_caching=False, **opts) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    with LLM(tiny_models["qwen3_moe"], **opts) as llm:
        first = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        assert llm.engine.stats()["prefix_cache_hits"] > 0
    assert first == want and again == want
