"""Token exchange of the colocated layout: every rank is both an attention replica and an
expert group, and each layer's routed rows go from every rank to every rank in one
``all_to_all_single`` (and the expert outputs come back in a second one).

Legend: N rows of one message, D hidden, K top-k, R ranks, B packed bytes (N * (8K + D * itemsize)).

One exchange, per (layer, micro-batch), all ranks together (a collective):
  1. row counts   int64[R]  all_to_all_single                      (the receiver sizes its buffer)
  2. rows         uint8[B]  all_to_all_single, splits in bytes     ids | weights | x, as torch_p2p packs
  3. outputs      x[N, D]   all_to_all_single, splits reversed     after the local expert FFN
Counts are read on the host after step 1 (one synchronisation per exchange on the GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from afdserve.transport.base import Rows, check_capacity
from afdserve.transport.torch_p2p import host_to_device, pack_rows, unpack_rows


class AllToAllExchange:
    """The dispatch and combine of one colocated rank over ``group`` (rank i of the group is
    expert group i). ``capacity``: the most rows one rank may send to one peer."""

    def __init__(self, rank: int, num_ranks: int, hidden_size: int, top_k: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int, group=None):
        self.rank, self.num_ranks, self.group = rank, num_ranks, group
        self.hidden_size, self.top_k, self.dtype = hidden_size, top_k, dtype
        self.device, self.capacity = torch.device(device), capacity
        self.row_bytes = 8 * top_k + hidden_size * dtype.itemsize
        self._staged: list[torch.Tensor] = []  # pinned count buffers of the exchange in flight

    def check(self) -> None:
        """Errors surface from the collectives themselves."""

    def dispatch(self, layer: int, mb: int, sends: Sequence[Rows]) -> tuple[list[Rows], list[int], list[int]]:
        """Send ``sends[r]`` to rank r; returns (one ``Rows`` per source rank, rows sent per
        peer, rows received per peer). Every rank must call it for the same (layer, mb)."""
        if len(sends) != self.num_ranks:
            raise ValueError(f"rank {self.rank}: dispatch needs one Rows per rank ({self.num_ranks}), got {len(sends)}")
        for peer, rows in enumerate(sends):
            rows.check(self.hidden_size, self.top_k, self.dtype, f"rank {self.rank} dispatch to rank {peer}")
            check_capacity(rows.num_rows, self.capacity, f"rank {self.rank}", f"rank {peer}", layer, mb)
        sent = [rows.num_rows for rows in sends]
        self._staged.clear()  # the previous exchange read its counts back: its copy is done
        counts_out = host_to_device(sent, self.device, self._staged)
        counts_in = torch.empty_like(counts_out)
        dist.all_to_all_single(counts_in, counts_out, group=self.group)
        received = counts_in.tolist()
        for peer, n in enumerate(received):
            check_capacity(n, self.capacity, f"rank {peer}", f"rank {self.rank}", layer, mb)
        payload = torch.cat([pack_rows(rows) for rows in sends])
        buf = torch.empty(sum(received) * self.row_bytes, dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(buf, payload, [n * self.row_bytes for n in received],
                               [n * self.row_bytes for n in sent], group=self.group)
        parts = torch.split(buf, [n * self.row_bytes for n in received])
        rows = [unpack_rows(p, n, self.hidden_size, self.top_k, self.dtype) for p, n in zip(parts, received)]
        return rows, sent, received

    def combine(self, outs: Sequence[torch.Tensor], sent: list[int], received: list[int]) -> list[torch.Tensor]:
        """Return ``outs[r]`` (the outputs for the rows rank r sent here) to their senders;
        returns one ``[sent[r], D]`` tensor per rank r, answering ``sends[r]`` row by row."""
        for peer, (y_ND, n) in enumerate(zip(outs, received)):
            if tuple(y_ND.shape) != (n, self.hidden_size) or y_ND.dtype != self.dtype:
                raise ValueError(f"rank {self.rank}: output for rank {peer} is {y_ND.dtype}{list(y_ND.shape)}, "
                                 f"expected {self.dtype}{[n, self.hidden_size]}")
        back = torch.empty(sum(sent), self.hidden_size, dtype=self.dtype, device=self.device)
        dist.all_to_all_single(back, torch.cat(list(outs)), sent, received, group=self.group)
        return list(torch.split(back, sent))
