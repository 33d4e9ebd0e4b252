"""Triton kernels of the shared-slot transport (``afdserve.transport.slots``) on CUDA: the
sender writes rows straight into a peer's slot and raises the slot's flag; the receiver's
stream waits for the flag on the GPU. No host synchronisation, no NCCL call.

Legend: T tokens, D hidden, K top-k, G destination groups (expert groups), S senders.

Ordering (PTX memory model): every program of a put kernel stores its rows, meets the other
threads of its block (``debug_barrier``), then adds 1 to the message's arrival counter with
release semantics at system scope; the program that arrives last acquires the others' stores
through that counter, writes the header and raises the flag with a system-scope release. The
wait kernel reads the flag with system-scope acquire loads, checks the header and records any
error in a device word the host reads at the end of the step (it never hangs: it gives up
after ``timeout_ns`` and lets the stream go on).

Error word (int64[5]): code, sender index, layer, micro-batch, the value that was wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ERR_TIMEOUT, ERR_COUNT, ERR_HEADER = 1, 2, 3
_TABLE_FIELDS = 5  # x, ids, w, header, flag addresses of one destination slot


@triton.jit
def _now_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _raise_flag(arrive_ptr, epoch_ptr, hdr_ptr, flag_ptr, count, layer, mb, num_programs):
    """Called by every program of a put after its stores: the last one to arrive publishes."""
    tl.debug_barrier()
    old = tl.atomic_add(arrive_ptr, 1, sem="acq_rel", scope="sys")
    if old == num_programs - 1:
        tl.store(arrive_ptr, 0)
        epoch = tl.load(epoch_ptr) + 1
        tl.store(epoch_ptr, epoch)
        tl.store(hdr_ptr, count.to(tl.int32))
        tl.store(hdr_ptr + 1, layer)
        tl.store(hdr_ptr + 2, mb)
        tl.atomic_xchg(flag_ptr, epoch, sem="release", scope="sys")


@triton.jit(do_not_specialize=["T", "G", "layer", "mb", "num_programs"])
def _put_rows_kernel(x_ptr, grp_ptr, slot_ptr, w_ptr, pos_ptr, table_ptr, arrive_ptr, epoch_ptr,
                     T, D: tl.constexpr, K, G, layer, mb, num_programs,
                     ONE_GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr):
    """Rows of tokens [pid*BLOCK_T, ...) that have a choice on group g into g's slot."""
    pid, g = tl.program_id(0), tl.program_id(1)
    tab = table_ptr + g * 5
    dst_x = tl.load(tab).to(tl.pointer_type(x_ptr.dtype.element_ty))
    dst_ids = tl.load(tab + 1).to(tl.pointer_type(tl.int32))
    dst_w = tl.load(tab + 2).to(tl.pointer_type(tl.float32))
    dst_hdr = tl.load(tab + 3).to(tl.pointer_type(tl.int32))
    dst_flag = tl.load(tab + 4).to(tl.pointer_type(tl.int64))
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, K_PAD)
    in_t, in_k = t < T, k < K
    tk = t.to(tl.int64)[:, None] * K + k[None, :]
    m_tk = in_t[:, None] & in_k[None, :]
    grp = tl.load(grp_ptr + tk, mask=m_tk, other=-1)
    here = grp == g
    if ONE_GROUP:
        row = t.to(tl.int64)
        send = in_t
        count = T
    else:
        row = tl.load(pos_ptr + t.to(tl.int64) * G + g, mask=in_t, other=0).to(tl.int64)
        send = in_t & (tl.sum(here.to(tl.int32), axis=1) > 0)
        last = tl.maximum(T - 1, 0).to(tl.int64)
        count = tl.load(pos_ptr + last * G + g, mask=T > 0, other=-1) + 1
    slot = tl.load(slot_ptr + tk, mask=m_tk, other=0)
    w = tl.load(w_ptr + tk, mask=m_tk, other=0.0).to(tl.float32)
    m_rk = send[:, None] & in_k[None, :]
    rk = row[:, None] * K + k[None, :]
    tl.store(dst_ids + rk, tl.where(here, slot, -1).to(tl.int32), mask=m_rk)
    tl.store(dst_w + rk, tl.where(here, w, 0.0), mask=m_rk)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d < D
        xv = tl.load(x_ptr + t.to(tl.int64)[:, None] * D + d[None, :], mask=in_t[:, None] & in_d[None, :])
        tl.store(dst_x + row[:, None] * D + d[None, :], xv, mask=send[:, None] & in_d[None, :])
    _raise_flag(arrive_ptr + g, epoch_ptr + g, dst_hdr, dst_flag, count, layer, mb, num_programs)


@triton.jit(do_not_specialize=["bound", "layer", "mb", "num_programs"])
def _put_reply_kernel(y_ptr, count_ptr, table_ptr, arrive_ptr, epoch_ptr, err_ptr, bound, D: tl.constexpr, layer,
                      mb, num_programs, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The first ``count`` (a device value, <= bound) rows of y into one peer's reply slot; after
    an error on this side, no rows and a count of -1 (the peer then reports it too)."""
    pid = tl.program_id(0)
    dst_x = tl.load(table_ptr).to(tl.pointer_type(y_ptr.dtype.element_ty))
    dst_hdr = tl.load(table_ptr + 3).to(tl.pointer_type(tl.int32))
    dst_flag = tl.load(table_ptr + 4).to(tl.pointer_type(tl.int64))
    count = tl.minimum(tl.load(count_ptr), bound)
    count = tl.where(tl.load(err_ptr, volatile=True) != 0, -1, count)
    r = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    ok = r < count
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (d < D)[None, :]
        off = r[:, None] * D + d[None, :]
        tl.store(dst_x + off, tl.load(y_ptr + off, mask=m), mask=m)
    _raise_flag(arrive_ptr, epoch_ptr, dst_hdr, dst_flag, count, layer, mb, num_programs)


@triton.jit(do_not_specialize=["layer", "mb", "timeout_ns", "first"])
def _wait_kernel(flag_ptr, flag_stride, expect_ptr, hdr_ptr, hdr_stride, bound_ptr, err_ptr, layer, mb,
                 timeout_ns, first, EXACT: tl.constexpr):
    """Program s waits for sender ``first + s``'s flag of this slot, then checks its header."""
    s = tl.program_id(0) + first
    expect = tl.load(expect_ptr + s) + 1
    tl.store(expect_ptr + s, expect)
    flag = flag_ptr + s * flag_stride
    seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
    start = _now_ns()
    waited = start - start
    failed = tl.load(err_ptr, volatile=True) != 0  # an earlier wait failed: do not spin again (fatal)
    while (seen < expect) & (waited < timeout_ns) & (failed == 0):
        seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
        waited = _now_ns() - start
    hdr = hdr_ptr + s * hdr_stride
    count = tl.load(hdr, volatile=True)
    hdr_layer = tl.load(hdr + 1, volatile=True)
    hdr_mb = tl.load(hdr + 2, volatile=True)
    bound = tl.load(bound_ptr + s)
    if EXACT:
        bad_count = count != bound
    else:
        bad_count = count > bound
    code = tl.where(seen < expect, 1, tl.where(count < 0, 4, tl.where(bad_count, 2, tl.where(
        (hdr_layer != layer) | (hdr_mb != mb), 3, 0))))
    value = tl.where(code == 1, seen, tl.where(code == 2, count, hdr_layer))
    if code != 0:
        code64 = code.to(tl.int64)
        if tl.atomic_cas(err_ptr, code64 * 0, code64) == 0:
            tl.store(err_ptr + 1, s.to(tl.int64))
            tl.store(err_ptr + 2, layer.to(tl.int64))
            tl.store(err_ptr + 3, mb.to(tl.int64))
            tl.store(err_ptr + 4, value.to(tl.int64))


def _block_t(d: int) -> int:
    return 8 if d >= 2048 else 32


def put_rows(x_TD: torch.Tensor, group_TK: torch.Tensor, slot_TK: torch.Tensor, w_TK: torch.Tensor,
             pos_TG: torch.Tensor | None, table_G5: torch.Tensor, arrive_G: torch.Tensor, epoch_G: torch.Tensor,
             layer: int, mb: int) -> None:
    """Write each token's row into the slot of every group it has a choice on (``pos_TG[t, g]``
    is its row there; None: one group, row = token) and raise each slot's flag."""
    t, d = x_TD.shape
    k, g = group_TK.shape[1], table_G5.shape[0]
    block_t = _block_t(d)
    programs = max(1, triton.cdiv(t, block_t))
    pos = pos_TG if pos_TG is not None else group_TK  # not read when ONE_GROUP
    _put_rows_kernel[(programs, g)](x_TD.contiguous(), group_TK.contiguous(), slot_TK.contiguous(),
                                    w_TK.contiguous(), pos, table_G5, arrive_G, epoch_G, t, d, k, g, layer, mb,
                                    programs, ONE_GROUP=pos_TG is None, BLOCK_T=block_t,
                                    BLOCK_D=min(1024, triton.next_power_of_2(d)),
                                    K_PAD=triton.next_power_of_2(k))


def put_reply(y_ND: torch.Tensor, count: torch.Tensor, table_5: torch.Tensor, arrive: torch.Tensor,
              epoch: torch.Tensor, err: torch.Tensor, layer: int, mb: int) -> None:
    """Write the first ``count`` rows of ``y_ND`` (count on the device) into a peer's reply slot
    (none, count -1, once ``err`` holds an error of this side)."""
    n, d = y_ND.shape
    block_t = _block_t(d)
    programs = max(1, triton.cdiv(n, block_t))
    _put_reply_kernel[(programs,)](y_ND.contiguous(), count, table_5, arrive, epoch, err, n, d, layer, mb, programs,
                                   BLOCK_T=block_t, BLOCK_D=min(1024, triton.next_power_of_2(d)))


def wait_flags(flags: torch.Tensor, expect: torch.Tensor, headers: torch.Tensor, bounds: torch.Tensor,
               err: torch.Tensor, layer: int, mb: int, timeout_s: float, exact: bool, first: int = 0,
               count: int | None = None) -> None:
    """Make the current stream wait for the flags of senders ``first .. first + count - 1``
    (``flags``/``headers``: this slot's column, one row per sender; ``expect``: the epoch each
    was last seen at, advanced here), then check each header against ``bounds`` (``exact``:
    the count must equal it, else not exceed it)."""
    count = flags.shape[0] - first if count is None else count
    if count:
        _wait_kernel[(count,)](flags, flags.stride(0), expect, headers, headers.stride(0), bounds, err, layer, mb,
                               int(timeout_s * 1e9), first, EXACT=exact)
