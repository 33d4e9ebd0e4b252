"""Pure-torch reference of the M2N exchange, and the permute/unpermute the attention side uses.

Legend: T tokens, D hidden, K top-k, E experts, G expert groups, R rows sent (sum over groups
of N_g), P passes (the most rows any one token has, <= min(K, G)).

``route`` builds one ``Rows`` message per expert group, ``unroute`` sums the groups' partial
outputs back per token, ``reference_m2n`` is what a perfect transport delivers. Both
``route`` and ``unroute`` are vectorised and deterministic (the partial rows of a token are
added in expert-group order, so the result is bitwise the same on every run and device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from afdserve.expert.placement import ExpertPlacement, ReplicaPlacement
from afdserve.transport.base import Rows


@dataclass(frozen=True)
class RouteHandle:
    """How the rows of a ``route`` map back to tokens.

    token_R: int64 token index of every sent row; rows are ordered by (group, token), so the
    rows of group g are token_R[offset_g : offset_g + counts[g]]. pass_rows[p]: the rows
    that are the (p+1)-th row of their token (each token at most once per pass).
    """

    token_R: torch.Tensor
    counts: tuple[int, ...]
    pass_rows: tuple[torch.Tensor, ...]


def route(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_w_TK: torch.Tensor,
          placement: ExpertPlacement | ReplicaPlacement) -> tuple[list[Rows], RouteHandle]:
    """Permute tokens into one message per expert group (A2E dispatch preparation).

    Parameters: x_TD hidden states; topk_ids_TK global expert ids (any int dtype, in [0, E), or -1: no expert);
    ``placement`` is one layer's (``for_layer``): it picks each pair's group and local slot.
    topk_w_TK router weights. Returns (sends, handle): sends[g] holds, in token order, the
    tokens with at least one of their top-k experts on group g: x_ND, ids_NK = local slot on
    g (int32, -1 where the choice lives elsewhere), w_NK (float32, 0 where the id is -1).
    """
    num_tokens, num_groups = x_TD.shape[0], placement.num_groups
    group_TK, slot_TK = placement.assign(topk_ids_TK)
    if num_groups == 1:  # every row goes to the one group in token order: no permutation, no host sync
        rows_T = torch.arange(num_tokens, device=x_TD.device)
        sends = [Rows(x_TD, slot_TK.to(torch.int32), topk_w_TK.float())]
        return sends, RouteHandle(rows_T, (num_tokens,), (rows_T,))
    on_TG = on_groups(group_TK, num_groups)
    group_R, token_R = on_TG.t().nonzero(as_tuple=True)  # row-major over [G, T]: group, then token
    here_RK = group_TK[token_R] == group_R[:, None]
    ids_RK = torch.where(here_RK, slot_TK[token_R], -1).to(torch.int32)
    w_RK = torch.where(here_RK, topk_w_TK[token_R].float(), 0.0)
    x_RD = x_TD[token_R]
    # the p-th row of a token is the one for its p-th group (groups ascending)
    pass_R = (on_TG.cumsum(1) - 1)[token_R, group_R]
    num_passes = min(topk_ids_TK.shape[1], num_groups)
    sizes = torch.cat([on_TG.sum(0), torch.bincount(pass_R, minlength=num_passes)]).tolist()
    counts, pass_counts = sizes[:num_groups], sizes[num_groups:]
    order_R = torch.argsort(pass_R, stable=True)
    handle = RouteHandle(token_R, tuple(counts), tuple(torch.split(order_R, pass_counts)))
    sends = [Rows(x, i, w) for x, i, w in zip(x_RD.split(counts), ids_RK.split(counts), w_RK.split(counts))]
    return sends, handle


def on_groups(group_TK: torch.Tensor, num_groups: int) -> torch.Tensor:
    """bool [T, G]: whether token t has a choice on group g (a group of -1, a padding row's,
    is none)."""
    return (group_TK[:, :, None] == torch.arange(num_groups, device=group_TK.device)).any(1)


def unroute(partials: Sequence[torch.Tensor], handle: RouteHandle, num_tokens: int) -> torch.Tensor:
    """Sum each token's partial rows over expert groups (E2A combine): returns y_TD.

    ``partials[g]`` is ``[N_g, D]``, row i answering row i of ``sends[g]``; tokens that were
    sent nowhere get 0. Rows are added in group order, one pass per row rank, so no index is
    repeated within an ``index_add_`` and the sum is deterministic on every device.
    """
    if len(partials) != len(handle.counts):
        raise ValueError(f"expected {len(handle.counts)} partial outputs (one per expert group), got {len(partials)}")
    for g, (p, n) in enumerate(zip(partials, handle.counts)):
        if p.shape[0] != n:
            raise ValueError(f"partial output of expert group {g} has {p.shape[0]} rows, {n} were sent")
    if len(partials) == 1 and handle.counts[0] == num_tokens:  # one group, token order (see route)
        return partials[0]
    part_RD = torch.cat(list(partials))
    y_TD = torch.zeros(num_tokens, part_RD.shape[1], dtype=part_RD.dtype, device=part_RD.device)
    for rows in handle.pass_rows:
        y_TD.index_add_(0, handle.token_R[rows], part_RD[rows])
    return y_TD


def reference_m2n(all_sends: Sequence[Sequence[Rows]]) -> list[list[Rows]]:
    """What a perfect transport delivers: ``all_sends[a][e]`` (attention group a to expert
    group e) becomes ``received[e][a]``."""
    if not all_sends:
        return []
    num_groups = len(all_sends[0])
    for a, sends in enumerate(all_sends):
        if len(sends) != num_groups:
            raise ValueError(f"attention group {a} sends {len(sends)} messages, attention group 0 sends {num_groups}")
    return [[sends[e] for sends in all_sends] for e in range(num_groups)]
