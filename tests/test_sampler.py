"""Sampler filters against their definitions."""

from __future__ import annotations

import pytest
import torch

from afdserve.core import Request, RequestStatus, SamplingParams
from afdserve.sampler import probs_batch, sample


def _probs(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return probs_batch(logits_V[None], [params])[0]


def _adjusted(row_V: torch.Tensor, req: Request) -> torch.Tensor:
    from afdserve.sampler import PenaltyTable, adjust_batch

    return adjust_batch(row_V[None], [req], PenaltyTable(row_V.numel(), "cpu").gather)[0]


def _adjust_one_row(logits_V: torch.Tensor, req: Request) -> None:
    """The reference, one row in place, vLLM's order: repetition penalty (prompt and output
    tokens), then frequency and presence penalties (output tokens), then the logit bias (the
    sampler's code before ``adjust_batch``)."""
    p, dev = req.params, logits_V.device
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.prompt_token_ids) | set(req.output_token_ids)), device=dev)
        vals = logits_V[seen]
        logits_V[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and req.output_token_ids:
        ids, counts = torch.tensor(req.output_token_ids, device=dev).unique(return_counts=True)
        logits_V[ids] -= p.frequency_penalty * counts.float() + p.presence_penalty
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=dev)
        logits_V.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), device=dev))


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
    assert _adjusted(logits[0], _req([0], [1], repetition_penalty=2.0)).tolist() == [2.0, -4.0, 3.0, 1.0]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    row = _adjusted(torch.tensor([5.0, 5.0, 5.0, 5.0]), _req([3], [0, 0, 1], frequency_penalty=0.5,
                                                             presence_penalty=1.0))
    assert row.tolist() == [5.0 - 1.0 - 1.0, 5.0 - 0.5 - 1.0, 5.0, 5.0]  # token 3 only in the prompt


def test_logit_bias_steers_greedy_and_logprobs_stay_raw():
    logits = torch.tensor([[4.0, 0.0, 3.0]])
    tokens, lps = sample(logits, [_req([0], [], logit_bias={"1": 100, 2: -100.0}, logprobs=0)])
    assert tokens == [1]
    assert lps[0][1] == pytest.approx(float(torch.log_softmax(logits[0], -1)[1]))


@pytest.mark.parametrize("params,name", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logit_bias={"x": 1.0}), "logit_bias"),
    (dict(logit_bias={1: 200.0}), "logit_bias"), (dict(prompt_logprobs=1.5), "prompt_logprobs"),
    (dict(logprobs=True), "logprobs"), (dict(top_k=2.0), "top_k"), (dict(prompt_logprobs=21), "prompt_logprobs")])
def test_penalty_and_bias_validation(params, name):
    from afdserve.core import InvalidRequest

    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**params)
    assert e.value.param == name


def _random_requests(n: int, v: int, gen: torch.Generator) -> list[Request]:
    """Penalties of every kind (some < 1 or negative: they reward repeats), logit bias also on
    seen tokens, prompts and outputs with repeated tokens, some requests plain."""
    reqs = []
    for i in range(n):
        kw = {"repetition_penalty": [1.0, 1.7, 0.6][i % 3], "frequency_penalty": [0.0, 0.9, -0.5][i % 5 % 3],
              "presence_penalty": [0.0, 1.2, -0.8][i % 7 % 3]}
        prompt = torch.randint(0, v, (1 + i % 6,), generator=gen).tolist()
        if i % 4 == 0:
            kw["logit_bias"] = {prompt[0]: 4.0, 3: -2.5}
        req = Request(str(i), prompt, SamplingParams(temperature=0, logprobs=2, **kw))
        req.output_token_ids = torch.randint(0, v, (i % 9,), generator=gen).tolist()
        reqs.append(req)
    return reqs


def test_batched_adjustment_equals_the_per_row_one():
    """``adjust_batch`` (every row in a fixed number of launches; both samplers use it) gives
    each row what ``_adjust_one_row`` gives it one row at a time."""
    from afdserve.sampler import PenaltyTable, adjust_batch

    gen = torch.Generator().manual_seed(3)
    v = 40
    reqs = _random_requests(60, v, gen)
    raw_NV = torch.randn(len(reqs), v, generator=gen) * 2
    got = adjust_batch(raw_NV, reqs, PenaltyTable(v, "cpu").gather)
    want = raw_NV.clone()
    for i, req in enumerate(reqs):
        _adjust_one_row(want[i], req)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got, raw_NV)


def test_penalty_table_counts_tokens_once_including_the_one_in_flight():
    """The device table: a token sampled on the device counts at once (before the host reads
    it) and not again when the host appends it; tokens sampled on the host are caught up; a
    finished request's row is reused, cleared."""
    from afdserve.sampler import PenaltyTable

    v = 10
    table = PenaltyTable(v, "cpu")
    a = Request("a", [1, 1, 2], SamplingParams(temperature=0, frequency_penalty=1.0))
    a.output_token_ids = [4, 4]
    counts, prompt = table.gather([a])
    assert counts[0].tolist() == [0, 0, 0, 0, 2, 0, 0, 0, 0, 0] and prompt[0].nonzero()[:, 0].tolist() == [1, 2]
    table.add([a], torch.tensor([7]))  # sampled on the device, still in flight
    assert table.gather([a])[0][0, 7] == 1
    a.output_token_ids.append(7)  # the host reads it
    a.output_token_ids.append(5)  # a synchronous step sampled this one on the host
    counts, _ = table.gather([a])
    assert counts[0].tolist() == [0, 0, 0, 0, 2, 1, 0, 1, 0, 0]
    a.status = RequestStatus.FINISHED
    b = Request("b", [3], SamplingParams(temperature=0, presence_penalty=1.0))
    counts, prompt = table.gather([b])
    assert counts.sum() == 0 and prompt[0].nonzero()[:, 0].tolist() == [3]
    assert len(table.rows) == 1


def test_device_sampler_with_the_table_equals_the_host_sampler():
    """Greedy tokens and logprobs of ``sample_on_device`` (counts from a table filled in another
    order, the last token added on the device) equal the host sampler's."""
    from afdserve.sampler import PenaltyTable, sample_on_device

    gen = torch.Generator().manual_seed(4)
    v = 40
    reqs = _random_requests(60, v, gen)
    table = PenaltyTable(v, "cpu")
    table.gather([r for r in reversed(reqs) if r.params.penalizes])  # rows in another order
    last = torch.randint(0, v, (len(reqs),), generator=gen)
    penalised = [i for i, r in enumerate(reqs) if r.params.penalizes]
    table.add([reqs[i] for i in penalised], last[penalised])  # each one's token still in flight
    logits_NV = torch.randn(len(reqs), v, generator=gen) * 2
    got = sample_on_device(logits_NV, reqs, torch.Generator(), table)
    for i in penalised:
        reqs[i].output_token_ids.append(int(last[i]))  # the host's view once it read them
    want_tokens, want_lp = sample(logits_NV, reqs)
    assert got.tokens_N.tolist() == want_tokens
    top_lp, top_ids = got.top_lp_RW.tolist(), got.top_ids_RW.tolist()
    for i in range(len(reqs)):
        entry = {want_tokens[i]: float(got.token_lp_R[i])} | dict(zip(top_ids[i][:2], top_lp[i][:2]))
        assert entry.keys() == want_lp[i].keys()
        assert list(entry.values()) == pytest.approx([want_lp[i][t] for t in entry], abs=1e-6)


def test_host_sampler_with_the_table_over_many_steps():
    """The synchronous engine's use of the table: step after step the host appends each token
    and the table catches up one token per request; requests finish and new ones take their
    rows. Every step's tokens equal the sampler that counts whole histories."""
    from afdserve.sampler import PenaltyTable

    gen = torch.Generator().manual_seed(5)
    v = 30
    table = PenaltyTable(v, "cpu")
    live = _random_requests(12, v, gen)
    fresh = _random_requests(24, v, gen)[12:]
    for step in range(20):
        logits_NV = torch.randn(len(live), v, generator=gen) * 2
        with_table, _ = sample(logits_NV, live, penalties=table)
        assert with_table == sample(logits_NV, live)[0], step
        for req, token in zip(live, with_table):
            req.output_token_ids.append(token)
        if step % 4 == 3:  # one finishes, a new one arrives
            live[0].status = RequestStatus.FINISHED
            live = live[1:] + [fresh.pop()]
    assert table.counts_SV.shape[0] <= 16  # finished requests' rows were reused


@pytest.mark.parametrize("params", [
    dict(repetition_penalty=1e-38, temperature=1.0),  # seen positive logits / 1e-38 -> inf
    dict(repetition_penalty=1e-38, temperature=1e-4, top_p=0.5),
    dict(repetition_penalty=1e-38, temperature=0.0),
    dict(logit_bias={1: 100, 2: 100}, temperature=float("inf")),
    dict(temperature=1e-5, top_k=3, min_p=0.5),
])
def test_extreme_values_never_break_sampling(params):
    """A request whose penalties or temperature overflow the logits (or whose model logits are
    NaN) still gets a token: host and device samplers, never an exception."""
    from afdserve.sampler import PenaltyTable, sample_on_device

    v = 16
    logits_NV = torch.randn(3, v) * 50
    logits_NV[2] = float("nan")  # a broken row beside the others
    reqs = []
    for i in range(3):
        req = Request(f"r{i}", [1, 2, 3, 4], SamplingParams(**params, logprobs=2))
        req.output_token_ids = [5, 1]
        reqs.append(req)
    for tokens in (sample(logits_NV, reqs, torch.Generator().manual_seed(0))[0],
                   sample_on_device(logits_NV, reqs, torch.Generator().manual_seed(0), PenaltyTable(v, "cpu"))
                   .tokens_N.tolist()):
        assert all(0 <= t < v for t in tokens)
    probs_RV = probs_batch(logits_NV, [r.params for r in reqs])
    assert torch.isfinite(probs_RV).all() and torch.allclose(probs_RV.sum(-1), torch.ones(3))


def test_allowed_token_ids_limit_only_their_rows():
    """Greedy and sampled rows with allowed_token_ids only ever take those tokens; a row
    without them is unchanged; logprobs stay those of the raw distribution."""
    gen = torch.Generator().manual_seed(6)
    v = 12
    logits_NV = torch.randn(3, v, generator=gen) * 3
    reqs = [Request("a", [1], SamplingParams(temperature=0, allowed_token_ids=[7, 2, 7], logprobs=1)),
            Request("b", [1], SamplingParams(temperature=1.0, allowed_token_ids=[4, 9])),
            Request("c", [1], SamplingParams(temperature=0))]
    assert reqs[0].params.allowed_token_ids == [2, 7]
    for seed in range(20):
        tokens, lps = sample(logits_NV, reqs, torch.Generator().manual_seed(seed))
        assert tokens[0] == max((2, 7), key=lambda t: logits_NV[0, t]) and tokens[1] in (4, 9)
        assert tokens[2] == int(logits_NV[2].argmax())
        assert lps[0][tokens[0]] == pytest.approx(float(torch.log_softmax(logits_NV[0], -1)[tokens[0]]), abs=1e-6)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
