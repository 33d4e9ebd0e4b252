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


def test_device_penalties_and_bias_equal_the_host_ones():
    """``sample_on_device`` (all rows at once, no host sync) adjusts the logits as the host
    sampler does row by row: repetition (prompt and output), frequency, presence, logit bias;
    a token still in flight (``pending``) counts as output. Greedy tokens and logprobs compared."""
    from afdserve.sampler import sample_on_device

    gen = torch.Generator().manual_seed(3)
    v, n = 40, 60
    logits_NV = torch.randn(n, v, generator=gen) * 2
    pending_tokens = torch.randint(0, v, (n,), generator=gen)
    device_reqs, host_reqs = [], []
    for i in range(n):
        kw = {"repetition_penalty": [1.0, 1.7, 0.6][i % 3], "frequency_penalty": [0.0, 0.9, -0.5][i % 5 % 3],
              "presence_penalty": [0.0, 1.2, -0.8][i % 7 % 3]}
        if i % 4 == 0:
            kw["logit_bias"] = {int(torch.randint(0, v, (1,), generator=gen)): 4.0, 3: -2.5}
        params = SamplingParams(temperature=0, logprobs=2, **kw)
        prompt = torch.randint(0, v, (1 + i % 6,), generator=gen).tolist()
        out = torch.randint(0, v, (i % 9,), generator=gen).tolist()
        late = i % 2 == 0
        dev_req = Request(str(i), prompt, params)
        dev_req.output_token_ids, dev_req.num_pending = list(out), int(late)
        host_req = Request(str(i), prompt, params)
        host_req.output_token_ids = out + ([int(pending_tokens[i])] if late else [])
        device_reqs.append(dev_req)
        host_reqs.append(host_req)
    index = {id(r): i for i, r in enumerate(device_reqs)}
    got = sample_on_device(logits_NV, device_reqs, torch.Generator(), (pending_tokens, index))
    want_tokens, want_lp = sample(logits_NV, host_reqs)
    assert got.tokens_N.tolist() == want_tokens
    assert got.lp_rows == list(range(n))
    top_lp, top_ids = got.top_lp_RW.tolist(), got.top_ids_RW.tolist()
    for i in range(n):
        entry = {want_tokens[i]: float(got.token_lp_R[i])} | dict(zip(top_ids[i][:2], top_lp[i][:2]))
        assert entry.keys() == want_lp[i].keys()
        assert list(entry.values()) == pytest.approx([want_lp[i][t] for t in entry], abs=1e-6)
