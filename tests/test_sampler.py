"""Sampler filters against their definitions."""

from __future__ import annotations

import torch

from afdserve.core import Request, SamplingParams
from afdserve.sampler import _probs, sample


def test_top_k_keeps_k_tokens():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    probs = _probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.nonzero(probs).flatten().tolist() == [1, 3]


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs_in = torch.tensor([0.5, 0.3, 0.15, 0.05])
    probs = _probs(probs_in.log(), SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.nonzero(probs).flatten().tolist() == [0, 1]
    assert torch.allclose(probs[:2], torch.tensor([0.5, 0.3]) / 0.8)


def test_min_p_drops_unlikely_tokens():
    probs_in = torch.tensor([0.6, 0.3, 0.09, 0.01])
    probs = _probs(probs_in.log(), SamplingParams(temperature=1.0, min_p=0.1))
    assert torch.nonzero(probs).flatten().tolist() == [0, 1, 2]


def test_greedy_and_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    reqs = [Request(str(i), [1], SamplingParams(temperature=0, logprobs=2)) for i in range(2)]
    tokens, lps = sample(logits, reqs)
    assert tokens == [1, 0]
    assert set(lps[0]) == {1, 2}
    assert abs(lps[0][1] - torch.log_softmax(logits[0], -1)[1].item()) < 1e-6
