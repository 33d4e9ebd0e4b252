"""M2N transport over torch.distributed point-to-point ops (Gloo on CPU, NCCL on GPU).

Legend: N rows of one message, D hidden, K top-k, A attention groups, G expert groups,
B bytes of a packed message (N * (8K + D * itemsize)).

Wire protocol of one (layer, mb), per (attention leader a, expert leader e):
  a -> e  count  int64[1]      always, also for N = 0                          (A2E group)
  a -> e  rows   uint8[B]      ids_NK int32 | w_NK float32 | x_ND, packed;
                               only when N > 0                                 (A2E group)
  e -> a  reply  x_ND          only when N > 0 (both sides know N)             (E2A group)
The attention side issues count and rows in one batch and posts the reply receives in
another; the expert side receives every count, then the rows (sizes first, then payload), and
replies in one batch. The two directions use separate process groups (``Groups.a2e``/``e2a``;
without them both fall back to the world group), so on NCCL the rows of micro-batch i+1 are
not held up behind the replies of micro-batch i.

Keeping (layer, mb) messages apart: Gloo matches messages by tag, derived from (layer, mb,
kind), so the micro-batches in flight may even be waited for out of order. NCCL ignores tags
and matches by issue order, so on NCCL both sides must issue in the schedule's order (the
pipeline executors do): attention dispatch(l, 0), dispatch(l, 1), ...; expert receive(l, i),
receive_wait, reply(l, i), then receive(l, i + 1). The first P2P call on NCCL must follow a
collective over every rank (``init_distributed`` ends with one).

This transport allocates each received message at its exact size (host-known counts), so it
never aliases buffers between micro-batches; ``capacity`` is enforced as in the interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from afdserve.transport.base import Rows, check_capacity
from afdserve.transport.groups import Groups
from afdserve.transport.reference import route, unroute
from afdserve.transport.topology import Topology

COUNT, ROWS, REPLY = 0, 1, 2  # message kinds
MAX_MICRO_BATCHES = 256  # micro-batch slots the tags can tell apart


def message_tag(layer: int, mb: int, kind: int) -> int:
    """Tag of a message; layers wrap modulo 2**16 (issue order separates repeats)."""
    return ((layer % 65536) * MAX_MICRO_BATCHES + mb) * 4 + kind


def pack_rows(rows: Rows) -> torch.Tensor:
    """Rows -> one uint8[B] buffer: ids, then weights (4-byte aligned), then x."""
    parts = (rows.ids_NK, rows.w_NK, rows.x_ND)
    return torch.cat([p.contiguous().view(torch.uint8).reshape(-1) for p in parts])


def unpack_rows(buf_B: torch.Tensor, n: int, hidden_size: int, top_k: int, dtype: torch.dtype) -> Rows:
    """Inverse of ``pack_rows``: views into ``buf_B``."""
    nk = n * top_k * 4
    return Rows(buf_B[2 * nk:].view(dtype).view(n, hidden_size), buf_B[:nk].view(torch.int32).view(n, top_k),
                buf_B[nk:2 * nk].view(torch.float32).view(n, top_k))


@dataclass
class P2PHandle:
    """In-flight ops of one (layer, mb) call; tensors are kept alive until the wait."""

    layer: int
    mb: int
    works: list = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # rows per peer, when known
    outputs: list[torch.Tensor] = field(default_factory=list)  # what the wait returns
    waited: bool = False
    routing: object = None  # dispatch_tokens: how the rows map back to tokens
    num_tokens: int = 0


class TorchP2PTransport:
    """One group leader's end of the M2N transport; its side follows from ``rank``'s role.

    An attention leader uses ``dispatch``/``combine_wait``, an expert leader ``receive``/
    ``receive_wait``/``reply``/``reply_wait``. ``capacity`` is the attention side's maximum
    tokens per micro-batch, the same on every rank. Needs an initialised default process
    group whose ranks are the topology's global ranks (``init_distributed``).
    """

    def __init__(self, topology: Topology, rank: int, hidden_size: int, top_k: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int, groups: Groups | None = None):
        role = topology.role_of(rank)
        if not role.is_leader:
            raise ValueError(f"{topology.describe(rank)} is not its group's leader: only tp rank 0 of a group "
                             "talks to the other side")
        if capacity < 1:
            raise ValueError(f"transport capacity must be >= 1 row, got {capacity}")
        self.topology, self.rank, self.role, self.capacity = topology, rank, role, capacity
        self.hidden_size, self.top_k, self.dtype, self.device = hidden_size, top_k, dtype, torch.device(device)
        self.peers = topology.expert_leaders if role.role == "attn" else topology.attn_leaders
        self.a2e = groups.a2e if groups is not None else None  # None: the world group
        self.e2a = groups.e2a if groups is not None else None
        self._slots: dict[int, P2PHandle] = {}  # micro-batch slot -> its pending exchange

    @classmethod
    def attn_side(cls, topology: Topology, rank: int, hidden_size: int, top_k: int, dtype: torch.dtype,
                  device: torch.device | str, capacity: int, groups: Groups | None = None) -> TorchP2PTransport:
        """The transport of an attention leader (raises if ``rank`` is not one)."""
        return cls._side("attn", topology, rank, hidden_size, top_k, dtype, device, capacity, groups)

    @classmethod
    def expert_side(cls, topology: Topology, rank: int, hidden_size: int, top_k: int, dtype: torch.dtype,
                    device: torch.device | str, capacity: int, groups: Groups | None = None) -> TorchP2PTransport:
        """The transport of an expert leader (raises if ``rank`` is not one)."""
        return cls._side("expert", topology, rank, hidden_size, top_k, dtype, device, capacity, groups)

    @classmethod
    def _side(cls, side: str, topology: Topology, rank: int, *args) -> TorchP2PTransport:
        if topology.role_of(rank).role != side:
            raise ValueError(f"{topology.describe(rank)} cannot hold the {side} side of the transport")
        return cls(topology, rank, *args)

    # -- per step (nothing to agree on here: counts travel with every message) ------------------

    def begin_step(self, sizes: list[int] | None = None) -> None:
        """Start of a global step (the shared-slot transport announces micro-batch sizes here)."""

    def check(self) -> None:
        """Errors surface from the waits themselves."""

    # -- attention side ---------------------------------------------------------------------

    def dispatch_tokens(self, layer: int, mb: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                        topk_w_TK: torch.Tensor, placement) -> P2PHandle:
        """``route`` the tokens (``placement``: this layer's), then ``dispatch`` the rows."""
        sends, routing = route(x_TD, topk_ids_TK, topk_w_TK, placement)
        handle = self.dispatch(layer, mb, sends)
        handle.routing, handle.num_tokens = routing, x_TD.shape[0]
        return handle

    def combine_tokens(self, handle: P2PHandle) -> torch.Tensor:
        """``combine_wait``, then each token's sum over expert groups (``unroute``): y_TD."""
        return unroute(self.combine_wait(handle), handle.routing, handle.num_tokens)

    def dispatch(self, layer: int, mb: int, sends: Sequence[Rows]) -> P2PHandle:
        """Issue the rows for every expert group and post the receives of their replies."""
        self._expect("attn", "dispatch")
        if len(sends) != len(self.peers):
            raise ValueError(f"{self._me()}: dispatch needs one Rows per expert group ({len(self.peers)}), "
                             f"got {len(sends)}")
        for peer, rows in zip(self.peers, sends):
            rows.check(self.hidden_size, self.top_k, self.dtype, f"{self._me()} dispatch to {self._who(peer)}")
            check_capacity(rows.num_rows, self.capacity, self._me(), self._who(peer), layer, mb)
        handle = self._open_slot(layer, mb)
        handle.counts = [rows.num_rows for rows in sends]
        counts_G = host_to_device(handle.counts, self.device, handle.tensors)
        sends_ops, reply_ops = [], []
        for g, (peer, rows) in enumerate(zip(self.peers, sends)):
            sends_ops.append(self._op(dist.isend, counts_G[g:g + 1], peer, layer, mb, COUNT))
            reply_ND = torch.empty(rows.num_rows, self.hidden_size, dtype=self.dtype, device=self.device)
            handle.outputs.append(reply_ND)
            if rows.num_rows:
                handle.tensors.append(pack_rows(rows))
                sends_ops.append(self._op(dist.isend, handle.tensors[-1], peer, layer, mb, ROWS))
                reply_ops.append(self._op(dist.irecv, reply_ND, peer, layer, mb, REPLY))
        handle.tensors.append(counts_G)
        handle.works = _issue(sends_ops) + _issue(reply_ops)
        return handle

    def combine_wait(self, handle: P2PHandle) -> list[torch.Tensor]:
        """Wait for the replies of ``dispatch``: one [N_g, D] tensor per expert group."""
        self._expect("attn", "combine_wait")
        self._wait(handle, "the replies")
        self._close_slot(handle)
        return handle.outputs

    # -- expert side ------------------------------------------------------------------------

    def receive(self, layer: int, mb: int) -> P2PHandle:
        """Post the count receives of (layer, mb) from every attention group."""
        self._expect("expert", "receive")
        handle = self._open_slot(layer, mb)
        counts_A = torch.empty(len(self.peers), dtype=torch.int64, device=self.device)
        handle.tensors.append(counts_A)
        handle.works = _issue([self._op(dist.irecv, counts_A[a:a + 1], peer, layer, mb, COUNT)
                               for a, peer in enumerate(self.peers)])
        return handle

    def receive_wait(self, handle: P2PHandle) -> list[Rows]:
        """Wait for the counts, then receive the rows: one ``Rows`` per attention group."""
        self._expect("expert", "receive_wait")
        self._wait(handle, "the row counts")
        layer, mb = handle.layer, handle.mb
        handle.counts = handle.tensors[0].tolist()
        for peer, n in zip(self.peers, handle.counts):
            check_capacity(n, self.capacity, self._who(peer), self._me(), layer, mb)
        row_bytes = 8 * self.top_k + self.hidden_size * self.dtype.itemsize
        bufs = [torch.empty(n * row_bytes, dtype=torch.uint8, device=self.device) for n in handle.counts]
        ops = [self._op(dist.irecv, buf, peer, layer, mb, ROWS)
               for peer, n, buf in zip(self.peers, handle.counts, bufs) if n]
        handle.works, handle.waited = _issue(ops), False
        self._wait(handle, "the rows")
        return [unpack_rows(buf, n, self.hidden_size, self.top_k, self.dtype) for buf, n in zip(bufs, handle.counts)]

    def reply(self, layer: int, mb: int, outs: Sequence[torch.Tensor]) -> P2PHandle:
        """Issue the replies of (layer, mb): ``outs[a]`` answers the rows of attention group a."""
        self._expect("expert", "reply")
        received = self._slots.get(mb)
        if received is None or received.layer != layer or not received.waited:
            raise RuntimeError(f"{self._me()}: reply({layer}, {mb}) without a completed receive of that "
                               "layer and micro-batch")
        if len(outs) != len(self.peers):
            raise ValueError(f"{self._me()}: reply needs one tensor per attention group ({len(self.peers)}), "
                             f"got {len(outs)}")
        ops, keep = [], []
        for peer, n, y_ND in zip(self.peers, received.counts, outs):
            if tuple(y_ND.shape) != (n, self.hidden_size) or y_ND.dtype != self.dtype:
                raise ValueError(f"{self._me()}: reply to {self._who(peer)} is {y_ND.dtype}{list(y_ND.shape)}, "
                                 f"expected {self.dtype}{[n, self.hidden_size]} (one row per row received)")
            if n:
                keep.append(y_ND.contiguous())
                ops.append(self._op(dist.isend, keep[-1], peer, layer, mb, REPLY))
        self._close_slot(received)
        return P2PHandle(layer, mb, _issue(ops), keep)

    def reply_wait(self, handle: P2PHandle) -> None:
        """Wait until the replies are sent."""
        self._expect("expert", "reply_wait")
        self._wait(handle, "the reply sends")

    # -- bookkeeping ------------------------------------------------------------------------

    def _op(self, fn, tensor: torch.Tensor, peer: int, layer: int, mb: int, kind: int) -> dist.P2POp:
        """A P2P op on the group of its direction (rows and counts: A2E, replies: E2A)."""
        group = self.e2a if kind == REPLY else self.a2e
        return dist.P2POp(fn, tensor, peer, group=group, tag=message_tag(layer, mb, kind))

    def _open_slot(self, layer: int, mb: int) -> P2PHandle:
        if not 0 <= mb < MAX_MICRO_BATCHES:
            raise ValueError(f"micro-batch index {mb} is out of range [0, {MAX_MICRO_BATCHES})")
        if mb in self._slots:
            busy = self._slots[mb]
            raise RuntimeError(f"{self._me()}: micro-batch slot {mb} is still busy with layer {busy.layer}; "
                               f"finish it ({'combine_wait' if self.role.role == 'attn' else 'reply'}) first")
        self._slots[mb] = P2PHandle(layer, mb)
        return self._slots[mb]

    def _close_slot(self, handle: P2PHandle) -> None:
        if self._slots.get(handle.mb) is handle:
            del self._slots[handle.mb]

    def _wait(self, handle: P2PHandle, what: str) -> None:
        if handle.waited:
            raise RuntimeError(f"{self._me()}: layer {handle.layer}, micro-batch {handle.mb} was already waited for")
        try:
            for work in handle.works:
                work.wait()
        except RuntimeError as e:
            peers = ", ".join(self._who(p) for p in self.peers)
            raise RuntimeError(f"{self._me()}: waiting for {what} of layer {handle.layer}, micro-batch "
                               f"{handle.mb} (peers: {peers}) failed: {e}") from e
        handle.waited, handle.works = True, []

    def _expect(self, side: str, call: str) -> None:
        if self.role.role != side:
            raise RuntimeError(f"{self._me()} holds the {self.role.role} side; {call} is a {side}-side call")

    def _me(self) -> str:
        return self.topology.describe(self.rank)

    def _who(self, rank: int) -> str:
        return self.topology.describe(rank)


def host_to_device(values: list[int], device: torch.device, keep: list) -> torch.Tensor:
    """An int64 tensor of ``values`` on ``device`` without waiting for the GPU: staged in pinned
    memory and copied asynchronously (a plain copy from pageable memory would make the host wait
    for all queued GPU work). The staging tensor goes into ``keep`` and must outlive the copy."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    staged = torch.tensor(values, dtype=torch.int64).pin_memory()
    keep.append(staged)
    return staged.to(device, non_blocking=True)


def _issue(ops: list) -> list:
    """Start a batch of P2P ops (none for an empty batch)."""
    return dist.batch_isend_irecv(ops) if ops else []
