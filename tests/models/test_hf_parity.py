"""Our model against Hugging Face transformers on the same tiny checkpoint (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

# lengths from 1 token to more than one KV block (16)
PROMPT_LENS = [1, 5, 16, 17, 40]


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _hf_model(path: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with HF's own KV cache, never stopping early (no EOS)."""
    ids, past, out = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(n):
            res = model(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def test_prefill_logits_match_hf(tiny_models, family):
    path = tiny_models[family]
    hf = _hf_model(path)
    with LLM(path) as llm:
        engine = llm.engine
        for prompt in _prompts(hf.config.vocab_size):
            with torch.no_grad():
                ref = hf(torch.tensor([prompt])).logits[0].float()
            ours = _prefill_logits(engine, prompt)
            rel = (ours - ref).norm() / ref.norm()
            assert rel < 1e-4, f"{family} prompt of {len(prompt)} tokens: relative error {rel:.2e}"


def _prefill_logits(engine, prompt: list[int]) -> torch.Tensor:
    """All-position logits of one prompt through our engine's runner."""
    from afdserve.core import ScheduledChunk
    from afdserve.runner import prepare

    req = engine.add_request("parity", prompt, SamplingParams(max_tokens=1))
    engine.scheduler.schedule()  # admits the request and reserves its blocks
    inp = prepare([ScheduledChunk(req, 0, len(prompt))], engine.scheduler.block_size, "cpu")
    h_TD = engine.executor.forward(inp)
    engine.abort_request("parity")
    return engine.attn.logits(h_TD)


def test_greedy_generation_matches_hf(tiny_models, family):
    path = tiny_models[family]
    hf = _hf_model(path)
    prompts = _prompts(hf.config.vocab_size)
    with LLM(path) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ref = _hf_greedy(hf, prompt, 32)
        assert out.outputs[0].token_ids == ref, f"{family}, prompt of {len(prompt)} tokens"


def test_prompt_logprobs_match_hf(tiny_models):
    """Prompt logprobs (vLLM's prompt_logprobs) equal log-softmax of HF's logits at every prompt
    position, also when the prefill is chunked over several steps and when several requests
    share a step; the top entries are the most likely tokens."""
    path = tiny_models["qwen3_moe"]
    hf = _hf_model(path)
    prompts = _prompts(hf.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    with LLM(path, max_num_batched_tokens=24) as llm:  # the 40-token prompt takes two steps
        outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for p in range(1, len(prompt)):
            top = ref[p - 1].topk(3)
            want = {prompt[p]: float(ref[p - 1, prompt[p]])} | dict(zip(top.indices.tolist(), top.values.tolist()))
            assert got[p].keys() == want.keys()
            assert list(got[p].values()) == pytest.approx([want[t] for t in got[p]], abs=1e-4)
    with LLM(path) as llm:  # not asked for: None
        assert llm.generate(prompts[:1], SamplingParams(max_tokens=1))[0].prompt_logprobs is None
