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
