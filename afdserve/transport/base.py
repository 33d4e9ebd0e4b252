"""The M2N transport interface between attention groups and expert groups (DESIGN.md §5).

Legend: N rows of one message, D hidden size, K top-k.

Per layer ``l`` and micro-batch ``mb`` every attention leader sends one message to every expert
leader (also when it holds zero rows for it: the count still goes), and every expert leader
replies to every attention leader with one output row per row received, in the same order.

Issue and wait are separate calls so that the overlap is visible at the call site::

    # attention leader                          # expert leader
    h = t.dispatch(l, mb, sends)                h = t.receive(l, mb)
    ...attention of the next micro-batch...     rows = t.receive_wait(h)     # one Rows per attn group
    partials = t.combine_wait(h)                outs = experts(rows)
                                                r = t.reply(l, mb, outs); ...; t.reply_wait(r)

Capacity. A transport is built with ``capacity`` = the attention side's maximum number of
tokens in one micro-batch (a token goes to an expert group at most once, so no message is
longer). A transport may hold fixed receive buffers of ``capacity`` rows per (peer, micro-batch
slot), registered once; this is what a GPU-native transport needs to work without host
synchronisation (the sender writes rows and a count straight into the peer's buffer and raises
a flag; the count may stay on the device). A message longer than the capacity raises
``CapacityError`` naming both ranks, on the sender before anything is sent, and on the receiver.

Buffer lifetime. Tensors returned by ``receive_wait``/``combine_wait`` may be views of such
buffers: they stay valid until the next ``receive``/``dispatch`` of the same micro-batch slot
(``mb``); copy them to keep them longer.

Padding. A transport whose counts stay on the device may return ``capacity`` rows per peer
instead of the exact count: padding rows have every id -1 and weight 0 (they select no expert),
and replies carry as many rows as were received. Consumers must therefore treat ids of -1 as
"no expert here"; the expert math already does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class CapacityError(ValueError):
    """A message has more rows than the receive capacity of the transport."""


@dataclass(frozen=True)
class Rows:
    """One A2E message: the rows an attention group sends to one expert group.

    x_ND: the tokens' hidden states (model dtype); ids_NK: int32 local expert slot on the
    receiving group for each top-k choice, -1 where that choice lives on another group;
    w_NK: float32 router weight of each choice (0 where the id is -1).
    """

    x_ND: torch.Tensor
    ids_NK: torch.Tensor
    w_NK: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.x_ND.shape[0]

    @staticmethod
    def empty(hidden_size: int, top_k: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Rows:
        """A message with no rows (still sent: the receiver counts messages)."""
        return Rows(torch.empty(0, hidden_size, dtype=dtype, device=device),
                    torch.empty(0, top_k, dtype=torch.int32, device=device),
                    torch.empty(0, top_k, dtype=torch.float32, device=device))

    def check(self, hidden_size: int, top_k: int, dtype: torch.dtype, where: str) -> None:
        """Raise ValueError unless the shapes and dtypes are the ones the transport was built for."""
        n = self.num_rows
        expected = {"x_ND": ((n, hidden_size), dtype), "ids_NK": ((n, top_k), torch.int32),
                    "w_NK": ((n, top_k), torch.float32)}
        for name, (shape, dt) in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dt:
                raise ValueError(f"{where}: Rows.{name} is {t.dtype}{list(t.shape)}, expected {dt}{list(shape)}")


def check_capacity(num_rows: int, capacity: int, src: str, dst: str, layer: int, mb: int) -> None:
    """Raise ``CapacityError`` when a message from ``src`` to ``dst`` exceeds ``capacity`` rows."""
    if num_rows > capacity:
        raise CapacityError(f"message from {src} to {dst} at layer {layer}, micro-batch {mb} has {num_rows} rows, "
                            f"more than the transport capacity of {capacity} rows (the attention side's maximum "
                            "tokens per micro-batch); build every transport with the same, large enough capacity")


class AttnTransport(Protocol):
    """Attention-leader side: send rows to every expert group, wait for their partial sums."""

    capacity: int

    def dispatch(self, layer: int, mb: int, sends: Sequence[Rows]) -> Any:
        """Issue the A2E messages of (layer, mb), one ``Rows`` per expert group (N may be 0),
        and post the receives of the replies, whose row counts are known here. Non-blocking;
        returns a handle for ``combine_wait``."""
        ...

    def combine_wait(self, handle: Any) -> list[torch.Tensor]:
        """Wait for the replies of a dispatch: one ``[N_g, D]`` tensor per expert group ``g``,
        row i being the partial sum for row i of ``sends[g]``."""
        ...


class ExpertTransport(Protocol):
    """Expert-leader side: receive rows from every attention group, reply with outputs."""

    capacity: int

    def receive(self, layer: int, mb: int) -> Any:
        """Post the receives of (layer, mb) from every attention group. Non-blocking."""
        ...

    def receive_wait(self, handle: Any) -> list[Rows]:
        """Wait for the messages of a ``receive``: one ``Rows`` per attention group, in group order."""
        ...

    def reply(self, layer: int, mb: int, outs: Sequence[torch.Tensor]) -> Any:
        """Issue the E2A replies of (layer, mb): ``outs[a]`` is ``[N_a, D]`` for the N_a rows
        received from attention group ``a``. Non-blocking; returns a handle for ``reply_wait``."""
        ...

    def reply_wait(self, handle: Any) -> None:
        """Wait until the replies of ``reply`` are sent and their tensors may be reused."""
        ...
