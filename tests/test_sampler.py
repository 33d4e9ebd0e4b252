"""Sampler filters against their definitions."""

from __future__ import annotations

import pytest
import torch

from afdserve.core import Request, SamplingParams
from afdserve.sampler import probs_batch, sample


def _probs(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return probs_batch(logits_V[None], [params])[0]


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


def _req(prompt, output, **params):
    from afdserve.core import Request

    r = Request("r", list(prompt), SamplingParams(temperature=0, **params))
    r.output_token_ids = list(output)
    return r


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[4.0, -2.0, 3.0, 1.0]])
    tokens, _ = sample(logits, [_req([0], [1], repetition_penalty=2.0)])
    assert tokens == [2]  # 4 -> 2 for the prompt token 0, so token 2 (3.0) wins
    from afdserve.sampler import adjust_logits

    row = logits[0].clone()
    adjust_logits(row, _req([0], [1], repetition_penalty=2.0))
    assert row.tolist() == [2.0, -4.0, 3.0, 1.0]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    from afdserve.sampler import adjust_logits

    row = torch.tensor([5.0, 5.0, 5.0, 5.0])
    adjust_logits(row, _req([3], [0, 0, 1], frequency_penalty=0.5, presence_penalty=1.0))
    assert row.tolist() == [5.0 - 1.0 - 1.0, 5.0 - 0.5 - 1.0, 5.0, 5.0]  # token 3 only in the prompt


def test_logit_bias_steers_greedy_and_logprobs_stay_raw():
    logits = torch.tensor([[4.0, 0.0, 3.0]])
    tokens, lps = sample(logits, [_req([0], [], logit_bias={"1": 100, 2: -100.0}, logprobs=0)])
    assert tokens == [1]
    assert lps[0][1] == pytest.approx(float(torch.log_softmax(logits[0], -1)[1]))


@pytest.mark.parametrize("params,name", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logit_bias={"x": 1.0}), "logit_bias"),
    (dict(logit_bias={1: 200.0}), "logit_bias")])
def test_penalty_and_bias_validation(params, name):
    from afdserve.core import InvalidRequest

    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**params)
    assert e.value.param == name
