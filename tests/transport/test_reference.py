"""route/unroute against a naive per-token loop; reference_m2n transposes."""

from __future__ import annotations

import pytest
import torch

from afdserve.expert.placement import contiguous_placement
from afdserve.transport.base import Rows
from afdserve.transport.reference import reference_m2n, route, unroute


def _routing(seed: int, tokens: int, num_experts: int, top_k: int, hidden: int = 6):
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(tokens, hidden, generator=gen)
    ids_TK = torch.argsort(torch.rand(tokens, num_experts, generator=gen), dim=1)[:, :top_k]
    w_TK = torch.rand(tokens, top_k, generator=gen)
    return x_TD, ids_TK, w_TK


def _naive_route(x_TD, ids_TK, w_TK, placement):
    """One token at a time: the specification of route."""
    out = []
    for g in range(placement.num_groups):
        toks, ids, ws = [], [], []
        for t in range(x_TD.shape[0]):
            row_i, row_w = [], []
            for e, w in zip(ids_TK[t].tolist(), w_TK[t].tolist()):
                here = placement.group_of_expert[e] == g
                row_i.append(placement.slot_of_expert[e] if here else -1)
                row_w.append(w if here else 0.0)
            if any(i >= 0 for i in row_i):
                toks.append(t)
                ids.append(row_i)
                ws.append(row_w)
        out.append((toks, ids, ws))
    return out


def _naive_unroute(partials, tokens_per_group, num_tokens, hidden):
    y = torch.zeros(num_tokens, hidden)
    for t in range(num_tokens):
        for g, toks in enumerate(tokens_per_group):
            if t in toks:
                y[t] += partials[g][toks.index(t)]
    return y


CASES = [(8, 3, 2, 13), (8, 1, 2, 5), (8, 8, 3, 9), (5, 2, 3, 7), (60, 7, 4, 40), (4, 4, 4, 3)]


@pytest.mark.parametrize("num_experts,groups,top_k,tokens", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_matches_naive(num_experts, groups, top_k, tokens, seed):
    placement = contiguous_placement(num_experts, groups)
    x_TD, ids_TK, w_TK = _routing(seed, tokens, num_experts, top_k)
    sends, handle = route(x_TD, ids_TK, w_TK, placement)
    naive = _naive_route(x_TD, ids_TK, w_TK, placement)
    assert len(sends) == groups
    for rows, (toks, ids, ws) in zip(sends, naive):
        assert rows.ids_NK.dtype == torch.int32 and rows.w_NK.dtype == torch.float32
        assert torch.equal(rows.x_ND, x_TD[toks].reshape(-1, x_TD.shape[1]))
        assert rows.ids_NK.tolist() == ids
        assert torch.equal(rows.w_NK, torch.tensor(ws, dtype=torch.float32).reshape(-1, top_k))
    assert handle.counts == tuple(len(t) for t, _, _ in naive)
    # unroute of arbitrary partials equals the per-token sum, bitwise (group order)
    gen = torch.Generator().manual_seed(100 + seed)
    partials = [torch.randn(r.num_rows, x_TD.shape[1], generator=gen) for r in sends]
    y_TD = unroute(partials, handle, tokens)
    assert torch.equal(y_TD, _naive_unroute(partials, [t for t, _, _ in naive], tokens, x_TD.shape[1]))


def test_route_is_deterministic_and_identity_round_trip():
    placement = contiguous_placement(8, 3)
    x_TD, ids_TK, w_TK = _routing(5, 11, 8, 3)
    a, ha = route(x_TD, ids_TK, w_TK, placement)
    b, hb = route(x_TD, ids_TK, w_TK, placement)
    assert all(torch.equal(p.x_ND, q.x_ND) and torch.equal(p.ids_NK, q.ids_NK) for p, q in zip(a, b))
    assert torch.equal(ha.token_R, hb.token_R)
    # experts that return x scaled by 1 per held expert: the sum counts each token's K experts
    partials = [r.x_ND * (r.ids_NK >= 0).sum(1, keepdim=True) for r in a]
    assert torch.allclose(unroute(partials, ha, 11), 3 * x_TD)


def test_tokens_sent_nowhere_and_empty_batches():
    placement = contiguous_placement(4, 2)
    x_TD = torch.randn(3, 2)
    ids_TK = torch.tensor([[0, 1], [0, 1], [1, 0]])  # nothing on group 1
    sends, handle = route(x_TD, ids_TK, torch.ones(3, 2), placement)
    assert [r.num_rows for r in sends] == [3, 0]
    assert sends[1].ids_NK.shape == (0, 2)
    assert torch.equal(unroute([x_TD, torch.empty(0, 2)], handle, 3), x_TD)
    empty, h0 = route(torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2), placement)
    assert [r.num_rows for r in empty] == [0, 0]
    assert unroute([torch.empty(0, 2)] * 2, h0, 0).shape == (0, 2)


def test_unroute_checks_shapes():
    placement = contiguous_placement(4, 2)
    x_TD, ids_TK, w_TK = _routing(0, 5, 4, 2)
    sends, handle = route(x_TD, ids_TK, w_TK, placement)
    with pytest.raises(ValueError, match="one per expert group"):
        unroute([sends[0].x_ND], handle, 5)
    with pytest.raises(ValueError, match="expert group 1"):
        unroute([sends[0].x_ND, sends[1].x_ND[:-1]], handle, 5)


def test_reference_m2n_transposes():
    def rows(n):
        return Rows(torch.full((n, 2), float(n)), torch.zeros(n, 1, dtype=torch.int32), torch.ones(n, 1))
    all_sends = [[rows(1), rows(2)], [rows(3), rows(0)], [rows(5), rows(6)]]  # 3 attention x 2 expert groups
    got = reference_m2n(all_sends)
    assert [[r.num_rows for r in per_e] for per_e in got] == [[1, 3, 5], [2, 0, 6]]
    with pytest.raises(ValueError, match="attention group 1"):
        reference_m2n([[rows(1), rows(1)], [rows(1)]])


def test_padding_rows_choose_no_group():
    """Rows of id -1 (CUDA-graph padding) get group and slot -1 and travel to no group; the
    real rows route as they would alone."""
    placement = contiguous_placement(4, 2)
    ids_TK = torch.tensor([[0, 3], [2, 1], [-1, -1], [-1, -1]])
    group_TK, slot_TK = placement.assign(ids_TK)
    assert group_TK.tolist() == [[0, 1], [1, 0], [-1, -1], [-1, -1]]
    assert slot_TK.tolist() == [[0, 1], [0, 1], [-1, -1], [-1, -1]]
    x_TD = torch.randn(4, 2)
    sends, handle = route(x_TD, ids_TK, torch.ones(4, 2), placement)
    alone, _ = route(x_TD[:2], ids_TK[:2], torch.ones(2, 2), placement)
    for got, want in zip(sends, alone):
        assert torch.equal(got.x_ND, want.x_ND) and torch.equal(got.ids_NK, want.ids_NK)
    y_TD = unroute([r.x_ND for r in sends], handle, 4)
    assert torch.equal(y_TD[2:], torch.zeros(2, 2))
    one, _ = route(x_TD, ids_TK, torch.ones(4, 2), contiguous_placement(4, 1))  # one group: every row, ids -1
    assert one[0].num_rows == 4 and bool((one[0].ids_NK[2:] == -1).all())
