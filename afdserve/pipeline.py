"""The ping-pong schedule, written once as data (DESIGN.md §4).

One global step runs every layer for ``m`` micro-batches. Both sides follow a fixed
order of ops known in advance, so neither ever waits for a message that will not come:

attention side, for layer l and micro-batch i:  COMBINE(l-1, i) -> ATTN(l, i) -> DISPATCH(l, i)
expert side,    for layer l and micro-batch i:  RECEIVE(l, i)   -> EXPERT(l, i) -> REPLY(l, i)

The runtime executors (attention and expert workers) and the simulator replay these
lists; nothing else decides the order of work.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class OpKind(enum.Enum):
    ATTN = "attn"  # attention side: (embed at layer 0), norm, attention, residual, norm, router
    DISPATCH = "dispatch"  # attention side: issue the A2E send of the micro-batch's rows
    COMBINE = "combine"  # attention side: wait for the E2A rows, add them to the residual
    RECEIVE = "receive"  # expert side: wait for the rows of every attention group
    EXPERT = "expert"  # expert side: grouped expert FFN, per-token sum of the held experts
    REPLY = "reply"  # expert side: issue the E2A send back to every attention group


@dataclass(frozen=True)
class Op:
    kind: OpKind
    layer: int
    mb: int


def attention_schedule(num_layers: int, m: int) -> list[Op]:
    """Ops of one global step on an attention rank, in execution order.

    The combine of (l-1, i) is waited for only right before ATTN(l, i) needs it, so
    while micro-batch i is at the experts, attention works on micro-batch i+1.
    """
    _check(num_layers, m)
    ops: list[Op] = []
    for layer in range(num_layers):
        for mb in range(m):
            if layer > 0:
                ops.append(Op(OpKind.COMBINE, layer - 1, mb))
            ops.append(Op(OpKind.ATTN, layer, mb))
            ops.append(Op(OpKind.DISPATCH, layer, mb))
    ops.extend(Op(OpKind.COMBINE, num_layers - 1, mb) for mb in range(m))
    return ops


def expert_schedule(num_layers: int, m: int) -> list[Op]:
    """Ops of one global step on an expert rank, in execution order."""
    _check(num_layers, m)
    ops: list[Op] = []
    for layer in range(num_layers):
        for mb in range(m):
            ops.append(Op(OpKind.RECEIVE, layer, mb))
            ops.append(Op(OpKind.EXPERT, layer, mb))
            ops.append(Op(OpKind.REPLY, layer, mb))
    return ops


def _check(num_layers: int, m: int) -> None:
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if m < 1:
        raise ValueError(f"the number of micro-batches m must be >= 1, got {m}")
