"""Shared-slot M2N transport for group leaders on one node: senders write rows straight into
the receiver's memory and raise a flag; nothing goes through NCCL and no row count reaches the
host on the hot path (the interface is in ``transport.base``).

Legend: T tokens of a micro-batch, D hidden, K top-k, G expert groups, A attention groups,
S senders into one buffer, M slots (= micro-batches), C capacity in rows.

Memory. Every leader allocates one receive buffer and maps every peer's (CUDA IPC handles
through ``torch.multiprocessing``'s reductions on GPU; a ``/dev/shm`` file on CPU):

    flags    int64[S, M]        the epoch of the last message in (sender, slot)
    headers  int32[S, M, 4]     row count, layer, micro-batch, 0
    per (sender, slot): ids int32[C, K] | w float32[C, K] | x[C, D]     (expert side: rows)
                        x[C, D]                                         (attention side: replies)

Protocol of (layer, mb). The attention leader routes on the device and writes each token's row
into slot ``mb`` of every expert group it has a choice on, then raises those slots' flags
(``kernels.slots.put_rows``: one kernel, counts never leave the GPU). The expert leader's stream
waits for the flags of every attention group (``wait_flags``: a spin on the GPU, which gives up
after the timeout and records an error instead of hanging), runs its experts over ``bound`` rows
per sender (rows past the sender's count carry id -1: they select no expert) and writes the
first ``count`` output rows back into the attention leader's reply slot ``mb`` (``put_reply``).
The reply is also the acknowledgement: a sender writes slot ``mb`` again only after it has the
reply of the previous message there, and the receiver has consumed that message before it
replied (stream order on the receiving GPU), so no slot is overwritten while in use.

``bound``: per step, each attention leader sends its micro-batch sizes to every expert leader
over the CPU (Gloo) group (``begin_step``); no message to one group has more rows than the
micro-batch has tokens. Flags count up (epochs kept on the device by both sides), so nothing is
ever reset. Errors (a peer that never signals, a count past the bound, a header of another layer)
are recorded on the device and raised by ``check`` (called at every step start and after the
attention step) naming both ranks.

CPU: the same buffers and protocol with torch ops and a host-side wait (for tests and CPU runs;
it relies on the CPU's store order, as x86 gives: refused on other CPUs).
"""

from __future__ import annotations

import os
import platform
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from afdserve.transport.base import CapacityError, Rows
from afdserve.transport.reference import on_groups
from afdserve.transport.topology import Topology

ERRORS = {1: "no message arrived within the timeout", 2: "the row count {v} is past what was expected",
          3: "the header names layer {v}", 4: "the peer reported an error of its own (see its log)"}
_ALIGN = 256
_TOTAL_STORE_ORDER = ("x86_64", "amd64", "i386", "i686")  # CPUs whose stores become visible in order


class SlotTransportError(RuntimeError):
    """A message that never came or came wrong (names the ranks involved)."""


@dataclass
class _Slot:
    """Views of one (sender, slot) of a receive buffer."""

    x: torch.Tensor  # [C, D]
    ids: torch.Tensor | None  # [C, K] int32 (rows only)
    w: torch.Tensor | None  # [C, K] float32
    hdr: torch.Tensor  # int32[4]
    flag: torch.Tensor  # int64[] (a 0-d view)


@dataclass
class _Buffer:
    raw: torch.Tensor  # uint8, the whole allocation
    flags: torch.Tensor  # int64[S, M]
    headers: torch.Tensor  # int32[S, M, 4]
    slots: list[list[_Slot]]  # [sender][slot]


def _round(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def buffer_bytes(senders: int, slots: int, capacity: int, hidden: int, top_k: int, dtype: torch.dtype,
                 rows: bool) -> int:
    """Size of a receive buffer (``rows``: ids and weights too, the expert side's)."""
    per = _round(capacity * hidden * dtype.itemsize) + (2 * _round(capacity * top_k * 4) if rows else 0)
    return _round(senders * slots * 8) + _round(senders * slots * 16) + senders * slots * per


def _views(raw: torch.Tensor, senders: int, slots: int, capacity: int, hidden: int, top_k: int,
           dtype: torch.dtype, rows: bool) -> _Buffer:
    at = 0

    def take(n_bytes: int, dt: torch.dtype, shape: tuple) -> torch.Tensor:
        nonlocal at
        view = raw[at:at + n_bytes].view(dt).view(shape)
        at += _round(n_bytes)
        return view

    flags = take(senders * slots * 8, torch.int64, (senders, slots))
    headers = take(senders * slots * 16, torch.int32, (senders, slots, 4))
    out = []
    for s in range(senders):
        out.append([])
        for j in range(slots):
            ids = take(capacity * top_k * 4, torch.int32, (capacity, top_k)) if rows else None
            w = take(capacity * top_k * 4, torch.float32, (capacity, top_k)) if rows else None
            x = take(capacity * hidden * dtype.itemsize, dtype, (capacity, hidden))
            out[s].append(_Slot(x, ids, w, headers[s, j], flags[s, j]))
    return _Buffer(raw, flags, headers, out)


# -- shared memory ---------------------------------------------------------------------------

def _allocate(nbytes: int, device: torch.device) -> tuple[torch.Tensor, object]:
    """A zeroed buffer and the handle a peer process opens it with."""
    if device.type == "cuda":
        from torch.multiprocessing.reductions import reduce_tensor

        raw = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)
        _, args = reduce_tensor(raw)
        return raw, ("cuda", args)
    path = f"/dev/shm/afdserve-{uuid.uuid4().hex}"
    with open(path, "wb") as f:
        f.truncate(nbytes)
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8), ("cpu", path)


def _open(handle, device: torch.device) -> torch.Tensor:
    """Map a peer's buffer into this process. On CUDA the handle is opened in this process's own
    device context (with lazy peer access, as vLLM's custom all-reduce does), whatever GPU the
    memory is on: kernels here write it through that mapping. The tensor therefore claims this
    device; only its address is used."""
    if handle[0] == "cpu":
        size = os.path.getsize(handle[1])
        return torch.from_file(handle[1], shared=True, size=size, dtype=torch.uint8)
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(handle[1])
    args[6] = device.index if device.index is not None else torch.cuda.current_device()
    return rebuild_cuda_tensor(*args)


# -- the transport ---------------------------------------------------------------------------

@dataclass
class SlotHandle:
    layer: int
    mb: int
    num_tokens: int = 0
    on_TG: torch.Tensor | None = None  # attention side, more than one group: which groups a token went to
    pos_TG: torch.Tensor | None = None  # its row in each group's slot
    counts: list | None = None  # expert side: one 0-d count tensor per sender


class SlotTransport:
    """One group leader's end of the shared-slot transport (``attn_side`` / ``expert_side``).

    ``slots``: micro-batches in flight (the pipeline's m). ``group``: a process group of every
    leader, used at construction (handles) and per step (the Gloo micro-batch sizes).
    """

    routes_on_device = True

    def __init__(self, topology: Topology, rank: int, hidden_size: int, top_k: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int, slots: int, group=None, timeout_s: float = 120.0):
        role = topology.role_of(rank)
        if not role.is_leader:
            raise ValueError(f"{topology.describe(rank)} is not its group's leader: only tp rank 0 of a group "
                             "talks to the other side")
        if capacity < 1 or slots < 1:
            raise ValueError(f"transport capacity and slots must be >= 1, got {capacity} and {slots}")
        self.topology, self.rank, self.role, self.side = topology, rank, role, role.role
        self.hidden_size, self.top_k, self.dtype = hidden_size, top_k, dtype
        self.device, self.capacity, self.slots, self.group = torch.device(device), capacity, slots, group
        self.timeout_s, self.cuda = timeout_s, torch.device(device).type == "cuda"
        if not self.cuda and platform.machine().lower() not in _TOTAL_STORE_ORDER:
            raise ValueError(f"{topology.describe(rank)}: the shared-slot transport's CPU path relies on x86's store "
                             f"order, this CPU is {platform.machine()}; use --afd-transport p2p")
        attn = self.side == "attn"
        self.peers = topology.expert_leaders if attn else topology.attn_leaders
        self.index = role.group  # this leader's row in its peers' buffers
        own_senders, peer_senders = (topology.n_e, topology.n_a) if attn else (topology.n_a, topology.n_e)
        geometry = (slots, capacity, hidden_size, top_k, dtype)
        raw, handle = _allocate(buffer_bytes(own_senders, *geometry, rows=not attn), self.device)
        handles = [None] * len(topology.leaders)
        try:
            dist.all_gather_object(handles, handle, group=group)
            self.inbox = _views(raw, own_senders, *geometry, rows=not attn)
            leaders = topology.leaders
            self.outboxes = [_views(_open(handles[leaders.index(p)], self.device), peer_senders, *geometry,
                                    rows=attn) for p in self.peers]
            dist.barrier(group=group)  # every peer has mapped every buffer
        finally:
            if handle[0] == "cpu":
                os.unlink(handle[1])  # the mappings stay; on an error nothing is left behind
        self._busy: dict[int, int] = {}  # slot -> layer in flight
        self._bounds: list[list[int]] | None = None  # expert side: [mb][sender] rows at most
        self._sent = []  # Gloo sends of the sizes in flight
        self._epoch_out = [[0] * len(self.peers) for _ in range(slots)]  # CPU: last epoch sent per (mb, peer)
        self._epoch_in = [[0] * own_senders for _ in range(slots)]  # CPU: last epoch seen per (mb, sender)
        if self.cuda:
            dev = self.device
            out = [[self._dest(box, mb) for box in self.outboxes] for mb in range(slots)]
            self._table = torch.tensor(out, dtype=torch.int64, device=dev)  # [M, peers, 5]
            self._arrive = torch.zeros(slots, len(self.peers), dtype=torch.int32, device=dev)
            self._epoch_dev = torch.zeros(slots, len(self.peers), dtype=torch.int64, device=dev)
            self._expect = torch.zeros(slots, own_senders, dtype=torch.int64, device=dev)
            self._bound_dev = torch.zeros(slots, own_senders, dtype=torch.int32, device=dev)
            self._err = torch.zeros(5, dtype=torch.int64, device=dev)

    @classmethod
    def attn_side(cls, topology: Topology, rank: int, *args, **kw) -> SlotTransport:
        if topology.role_of(rank).role != "attn":
            raise ValueError(f"{topology.describe(rank)} cannot hold the attn side of the transport")
        return cls(topology, rank, *args, **kw)

    @classmethod
    def expert_side(cls, topology: Topology, rank: int, *args, **kw) -> SlotTransport:
        if topology.role_of(rank).role != "expert":
            raise ValueError(f"{topology.describe(rank)} cannot hold the expert side of the transport")
        return cls(topology, rank, *args, **kw)

    def _dest(self, box: _Buffer, mb: int) -> list[int]:
        s = box.slots[self.index][mb]
        return [s.x.data_ptr(), s.ids.data_ptr() if s.ids is not None else 0,
                s.w.data_ptr() if s.w is not None else 0, s.hdr.data_ptr(), s.flag.data_ptr()]

    # -- per step ---------------------------------------------------------------------------

    def begin_step(self, sizes: list[int] | None = None) -> list[list[int]] | None:
        """Start of a global step (after ``check``): the attention leader sends its micro-batch
        sizes (``sizes``, one per slot) to every expert leader; an expert leader receives them
        and returns them, ``[slot][attention group]``."""
        self.check()
        if self.side == "attn":
            if sizes is None or len(sizes) != self.slots:
                raise ValueError(f"{self._me()}: begin_step needs {self.slots} micro-batch sizes, got {sizes}")
            if max(sizes) > self.capacity:
                raise CapacityError(f"{self._me()}: a micro-batch of {max(sizes)} tokens is more than the "
                                    f"transport capacity of {self.capacity} rows")
            for w in self._sent:
                w.wait()
            msg = torch.tensor(sizes, dtype=torch.int64)
            self._sent = [dist.isend(msg, p, group=self.group) for p in self.peers]
            self._keep = msg
            return
        got = torch.zeros(len(self.peers), self.slots, dtype=torch.int64)
        for a, p in enumerate(self.peers):
            dist.recv(got[a], p, group=self.group)
        self._bounds = got.t().tolist()
        if int(got.max()) > self.capacity:
            a = int(got.max(1).values.argmax())
            raise CapacityError(f"{self._me()}: {self._who(self.peers[a])} announces a micro-batch of "
                                f"{int(got.max())} tokens, more than the transport capacity of {self.capacity} rows")
        if self.cuda:
            staged = got.t().to(torch.int32).contiguous().pin_memory()
            self._bound_dev.copy_(staged, non_blocking=True)
            self._staged = staged
        return self._bounds

    def expect_at_most(self, rows: int) -> None:
        """Expert side: take ``rows`` rows from every sender in every slot in the calls that
        follow (a CUDA graph captured for that many; each sender's count is still checked on
        the GPU against the sizes announced in the step it replays in)."""
        self._expect_side("expert", "expect_at_most")
        self._bounds = [[rows] * len(self.peers) for _ in range(self.slots)]

    def check(self) -> None:
        """Raise ``SlotTransportError`` for an error the GPU recorded (synchronises the stream)."""
        if not self.cuda:
            return
        code, s, layer, mb, value = self._err.tolist()
        if code:
            self._raise(code, s, layer, mb, value)

    def _raise(self, code: int, s: int, layer: int, mb: int, value: int) -> None:
        what = "replies" if self.side == "attn" else "rows"
        raise SlotTransportError(f"{self._me()}: {what} from {self._who(self.peers[s])} for layer {layer}, "
                                 f"micro-batch {mb}: {ERRORS[code].format(v=value)}"
                                 + (f" ({self.timeout_s:g} s)" if code == 1 else ""))

    # -- attention side ---------------------------------------------------------------------

    def dispatch_tokens(self, layer: int, mb: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                        topk_w_TK: torch.Tensor, placement) -> SlotHandle:
        """Route the micro-batch's tokens to the expert groups (``placement``: this layer's)
        and write them into the groups' slot ``mb``; returns the handle for ``combine_tokens``."""
        self._expect_side("attn", "dispatch_tokens")
        num_tokens = x_TD.shape[0]
        if num_tokens > self.capacity:
            raise CapacityError(f"{self._me()}: micro-batch {mb} of layer {layer} has {num_tokens} tokens, more "
                                f"than the transport capacity of {self.capacity} rows")
        self._open(layer, mb)
        group_TK, slot_TK = placement.assign(topk_ids_TK)
        h = SlotHandle(layer, mb, num_tokens)
        if len(self.peers) > 1:
            h.on_TG = on_groups(group_TK, len(self.peers))
            h.pos_TG = h.on_TG.cumsum(0, dtype=torch.int32) - 1
        w_TK = topk_w_TK.float()
        if self.cuda:
            from afdserve.kernels.slots import put_rows

            self._bound_dev[mb].copy_(h.on_TG.sum(0) if h.on_TG is not None else
                                      torch.full((1,), num_tokens, dtype=torch.int32, device=self.device))
            put_rows(x_TD, group_TK, slot_TK, w_TK, h.pos_TG, self._table[mb], self._arrive[mb],
                     self._epoch_dev[mb], layer, mb)
            return h
        for g, box in enumerate(self.outboxes):
            rows_N = (torch.arange(num_tokens) if h.on_TG is None else h.on_TG[:, g].nonzero()[:, 0])
            here_NK = group_TK[rows_N] == g
            self._put(box.slots[self.index][mb], g, layer, mb, x_TD[rows_N],
                      torch.where(here_NK, slot_TK[rows_N], -1), torch.where(here_NK, w_TK[rows_N], 0.0))
        return h

    def combine_tokens(self, h: SlotHandle) -> torch.Tensor:
        """Each token's sum of its expert groups' partial outputs (in group order), y_TD. May
        be a view of the reply slot: valid until the next dispatch of the same micro-batch."""
        self._expect_side("attn", "combine_tokens")
        sent = None if self.cuda else ([h.num_tokens] if h.on_TG is None else h.on_TG.sum(0).tolist())
        self._wait_all(h.layer, h.mb, sent, exact=True)
        self._busy.pop(h.mb, None)
        replies = [self.inbox.slots[g][h.mb].x for g in range(len(self.peers))]
        if h.on_TG is None:
            return replies[0][:h.num_tokens]
        y_TD = torch.zeros(h.num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        for g, rep in enumerate(replies):
            rows = rep[h.pos_TG[:, g].clamp(min=0).long()]
            y_TD += torch.where(h.on_TG[:, g, None], rows, 0)
        return y_TD

    # -- expert side ------------------------------------------------------------------------

    def receive(self, layer: int, mb: int) -> SlotHandle:
        self._expect_side("expert", "receive")
        self._open(layer, mb)
        return SlotHandle(layer, mb)

    def receive_wait(self, h: SlotHandle) -> list[Rows]:
        """One ``Rows`` per attention group, ``bound`` rows each (past the sender's count:
        id -1, weight 0). Views of the slot, valid until the reply of this micro-batch."""
        self._expect_side("expert", "receive_wait")
        if self._bounds is None:
            raise RuntimeError(f"{self._me()}: receive_wait before begin_step (the micro-batch sizes)")
        bounds = self._bounds[h.mb]
        self._wait_all(h.layer, h.mb, bounds, exact=False)
        out, h.counts = [], []
        for a, n in enumerate(bounds):
            s = self.inbox.slots[a][h.mb]
            count = s.hdr[0]
            valid_N1 = torch.arange(n, device=self.device)[:, None] < count
            out.append(Rows(s.x[:n], torch.where(valid_N1, s.ids[:n], -1), torch.where(valid_N1, s.w[:n], 0.0)))
            h.counts.append(count)
        self._received = h
        return out

    def reply(self, layer: int, mb: int, outs) -> SlotHandle:
        """Write each sender's first ``count`` output rows into its reply slot ``mb``."""
        self._expect_side("expert", "reply")
        h = getattr(self, "_received", None)
        if h is None or (h.layer, h.mb) != (layer, mb):
            raise RuntimeError(f"{self._me()}: reply({layer}, {mb}) without a completed receive of that "
                               "layer and micro-batch")
        bounds = self._bounds[mb]
        for a, (box, y_ND) in enumerate(zip(self.outboxes, outs)):
            if tuple(y_ND.shape) != (bounds[a], self.hidden_size) or y_ND.dtype != self.dtype:
                raise ValueError(f"{self._me()}: reply to {self._who(self.peers[a])} is {y_ND.dtype}"
                                 f"{list(y_ND.shape)}, expected {self.dtype}{[bounds[a], self.hidden_size]}")
            if self.cuda:
                from afdserve.kernels.slots import put_reply

                put_reply(y_ND, h.counts[a], self._table[mb, a], self._arrive[mb, a:a + 1],
                          self._epoch_dev[mb, a:a + 1], self._err, layer, mb)
            else:
                n = int(h.counts[a])
                self._put(box.slots[self.index][mb], a, layer, mb, y_ND[:n])
        self._received = None
        self._busy.pop(mb, None)
        return h

    def reply_wait(self, h: SlotHandle) -> None:
        """Nothing to wait for: the replies are ordered on this GPU's stream."""

    # -- CPU path and bookkeeping -------------------------------------------------------------

    def _put(self, slot: _Slot, peer: int, layer: int, mb: int, x_ND: torch.Tensor,
             ids_NK: torch.Tensor | None = None, w_NK: torch.Tensor | None = None) -> None:
        """CPU: write the rows and the header, then raise the flag (stores stay in order)."""
        n = x_ND.shape[0]
        slot.x[:n] = x_ND
        if ids_NK is not None:
            slot.ids[:n] = ids_NK
            slot.w[:n] = w_NK
        slot.hdr[:3] = torch.tensor([n, layer, mb], dtype=torch.int32)
        self._epoch_out[mb][peer] += 1
        slot.flag.fill_(self._epoch_out[mb][peer])

    def _wait_all(self, layer: int, mb: int, bounds: list[int], exact: bool) -> None:
        """Wait for every sender's message in slot ``mb`` and check its header: at most
        ``bounds[s]`` rows (``exact``: exactly; on CUDA the bounds are already on the device)."""
        if self.cuda:
            from afdserve.kernels.slots import wait_flags

            wait_flags(self.inbox.flags[:, mb], self._expect[mb], self.inbox.headers[:, mb], self._bound_dev[mb],
                       self._err, layer, mb, self.timeout_s, exact)
            return
        deadline = time.monotonic() + self.timeout_s
        for s in range(len(self.peers)):
            self._epoch_in[mb][s] += 1
            slot, spins = self.inbox.slots[s][mb], 0
            while int(slot.flag) < self._epoch_in[mb][s]:
                if time.monotonic() > deadline:
                    self._raise(1, s, layer, mb, int(slot.flag))
                spins += 1
                time.sleep(0 if spins < 100 else 1e-4)
            count, hdr_layer, hdr_mb = slot.hdr[:3].tolist()
            if count > bounds[s] or (exact and count != bounds[s]):
                self._raise(2, s, layer, mb, count)
            if (hdr_layer, hdr_mb) != (layer, mb):
                self._raise(3, s, layer, mb, hdr_layer)

    def _open(self, layer: int, mb: int) -> None:
        if not 0 <= mb < self.slots:
            raise ValueError(f"{self._me()}: micro-batch {mb} is out of range [0, {self.slots})")
        if mb in self._busy:
            raise RuntimeError(f"{self._me()}: micro-batch slot {mb} is still busy with layer {self._busy[mb]}")
        self._busy[mb] = layer

    def _expect_side(self, side: str, call: str) -> None:
        if self.side != side:
            raise RuntimeError(f"{self._me()} holds the {self.side} side; {call} is a {side}-side call")

    def _me(self) -> str:
        return self.topology.describe(self.rank)

    def _who(self, rank: int) -> str:
        return self.topology.describe(rank)
