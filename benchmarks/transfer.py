"""Transfer microbenchmark between attention and expert processes (issues 7 and 8).

M attention ranks and N expert ranks, one process per GPU (ranks 0..M-1 attention). For each
message size S (bytes per (sender, receiver) pair) and each method, a round trip is timed on
attention rank 0 (host clock, CUDA-synchronised): every attention rank sends S bytes to every
expert rank, every expert rank answers S bytes to every attention rank. Reported: one-way
latency (round trip / 2), median and p99 over the iterations, and GB/s per pair (S / one-way).

Methods:
  send_recv           dist.send / dist.recv (M = N = 1 only)
  batch_isend_irecv   one batch of isend/irecv per direction
  all_to_all_single   one all_to_all_single per direction over all ranks (0 bytes where no pair)
  afdserve_p2p        the engine's transport as the AFD layout uses it: count exchange, packed
                      rows (x + ids + weights), replies of x (TorchP2PTransport)
  afdserve_a2a        the colocated layout's exchange (AllToAllExchange: counts, rows, outputs),
                      every rank both sides (M + N ranks exchanging S with every other rank)
  afdserve_ipc        the shared-slot transport (SlotTransport): rows written into the expert's
                      slot by a Triton kernel, flags waited for on the GPU, replies likewise
                      (every token has a choice on every expert group, so each pair gets S)
  peer_copy           reference: one plain copy of S bytes into the first peer's memory (copy
                      engine, CUDA IPC), one way, no signal

More ranks than GPUs (e.g. ``--attn 4 --experts 4`` on two GPUs): ranks share the GPUs over a
Gloo group and only afdserve_ipc runs (protocol coverage, not a speed figure: the processes
time-slice the GPU); such rows carry ``"shared_gpus": true``.

Run: PYTHONPATH=. python3 benchmarks/transfer.py --attn 1 --experts 1 --out $OUT/transfer.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import statistics
import time

import torch
import torch.distributed as dist

HIDDEN = 4096
TOP_K = 2
METHODS = ("send_recv", "batch_isend_irecv", "all_to_all_single", "afdserve_p2p", "afdserve_a2a", "afdserve_ipc",
           "peer_copy")
SHARED_GPU_METHODS = ("afdserve_ipc",)


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def sizes_bytes(min_kb: int, max_mb: int) -> list[int]:
    out, s = [], min_kb << 10
    while s <= max_mb << 20:
        out.append(s)
        s *= 2
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, iters: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _worker(rank: int, world: int, m: int, port: int, sizes: list[int], iters: int, device_kind: str,
            methods: list[str], queue) -> None:
    from afdserve.transport.all_to_all import AllToAllExchange
    from afdserve.transport.groups import init_distributed
    from afdserve.transport.slots import SlotTransport
    from afdserve.transport.topology import Topology
    from afdserve.transport.torch_p2p import TorchP2PTransport

    cuda = device_kind == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    topo = Topology(n_a=m, tp_a=1, n_e=world - m, tp_e=1)
    shared = cuda and world > torch.cuda.device_count()  # several ranks per GPU: Gloo, no NCCL
    device = f"cuda:{rank % torch.cuda.device_count()}" if cuda else None
    groups = init_distributed(topo, rank, "nccl" if cuda and not shared else "gloo", f"tcp://127.0.0.1:{port}",
                              timeout_s=300, device=None if shared else device)
    dev = torch.device(device) if shared else groups.device
    if shared:
        torch.cuda.set_device(dev)
        methods = [x for x in methods if x in SHARED_GPU_METHODS]
    dtype = torch.bfloat16 if cuda else torch.float32
    attn = rank < m
    peers = list(range(m, world)) if attn else list(range(m))
    row_bytes = HIDDEN * dtype.itemsize + 8 * TOP_K
    max_rows = max(sizes) // row_bytes + 1
    p2p = a2a = None
    if not shared:
        side = TorchP2PTransport.attn_side if attn else TorchP2PTransport.expert_side
        p2p = side(topo, rank, HIDDEN, TOP_K, dtype, dev, max_rows, groups=groups)
        a2a = AllToAllExchange(rank, world, HIDDEN, TOP_K, dtype, dev, max_rows, group=groups.a2e)
    slots = None
    if "afdserve_ipc" in methods or "peer_copy" in methods:
        side = SlotTransport.attn_side if attn else SlotTransport.expert_side
        slots = side(topo, rank, HIDDEN, max(TOP_K, world - m), dtype, dev, max_rows, 1, group=groups.a2e,
                     timeout_s=60)
    results = []
    layer = [0]
    for size in sizes:
        fns, n = _size_fns(size, rank, world, attn, peers, dev, dtype, row_bytes, p2p, a2a, layer, slots, m)
        for method in methods:
            if method == "send_recv" and world != 2:
                continue
            times = _time(fns[method], dev, iters)
            one_way = times if method == "peer_copy" else [t / 2 for t in times]
            msg_bytes = n * row_bytes if method.startswith("afdserve") else size
            if method == "afdserve_ipc":
                msg_bytes = n * (HIDDEN * dtype.itemsize + 8 * slots.top_k)
            results.append({"method": method, "bytes": msg_bytes, "shared_gpus": shared,
                            "median_us": 1e6 * statistics.median(one_way),
                            "p99_us": 1e6 * p99(one_way),
                            "gb_per_s": msg_bytes / statistics.median(one_way) / 1e9})
    if rank == 0:
        queue.put(results)
    groups.destroy()


def _size_fns(size: int, rank: int, world: int, attn: bool, peers: list[int], dev, dtype, row_bytes: int,
              p2p, a2a, layer: list[int], slots, m: int):
    """The round trip of each method at ``size`` bytes per pair, and the rows of the engine's message."""
    from afdserve.transport.base import Rows

    buf = {p: torch.randint(0, 255, (size,), dtype=torch.uint8, device=dev) for p in peers}
    inbox = {p: torch.empty(size, dtype=torch.uint8, device=dev) for p in peers}
    n = max(1, size // row_bytes)
    msg = Rows(torch.randn(n, HIDDEN, device=dev).to(dtype), torch.zeros(n, TOP_K, dtype=torch.int32, device=dev),
               torch.ones(n, TOP_K, dtype=torch.float32, device=dev))

    def send_recv():
        if attn:
            dist.send(buf[peers[0]], peers[0])
            dist.recv(inbox[peers[0]], peers[0])
        else:
            dist.recv(inbox[peers[0]], peers[0])
            dist.send(buf[peers[0]], peers[0])

    def batch():
        first = [dist.P2POp(dist.isend if attn else dist.irecv, (buf if attn else inbox)[p], p) for p in peers]
        for w in dist.batch_isend_irecv(first):
            w.wait()
        second = [dist.P2POp(dist.irecv if attn else dist.isend, (inbox if attn else buf)[p], p) for p in peers]
        for w in dist.batch_isend_irecv(second):
            w.wait()

    flat_out = torch.cat([buf[p] for p in peers])
    flat_in = torch.empty_like(flat_out)
    split_there = [size if (r in peers) else 0 for r in range(world)]
    zero = [0] * world
    empty = torch.empty(0, dtype=torch.uint8, device=dev)

    def all_to_all():
        if attn:
            dist.all_to_all_single(flat_in[:0], flat_out, zero, split_there)
            dist.all_to_all_single(flat_in, empty, split_there, zero)
        else:
            dist.all_to_all_single(flat_in, empty, split_there, zero)
            dist.all_to_all_single(flat_in[:0], flat_out, zero, split_there)

    def afd_p2p():
        layer[0] += 1
        if attn:
            p2p.combine_wait(p2p.dispatch(layer[0], 0, [msg] * len(peers)))
        else:
            got = p2p.receive_wait(p2p.receive(layer[0], 0))
            p2p.reply_wait(p2p.reply(layer[0], 0, [r.x_ND for r in got]))

    sends_all = [msg if r != rank else Rows.empty(HIDDEN, TOP_K, dtype, dev) for r in range(world)]

    def afd_a2a():
        rows, sent, received = a2a.dispatch(0, 0, sends_all)
        a2a.combine([r.x_ND for r in rows], sent, received)

    fns = {"send_recv": send_recv, "batch_isend_irecv": batch, "all_to_all_single": all_to_all,
           "afdserve_p2p": afd_p2p, "afdserve_a2a": afd_a2a}
    if slots is not None:
        fns |= _slot_fns(slots, n, attn, dev, dtype, layer, world - m, buf[peers[0]])
    return fns, n


def _slot_fns(t, n: int, attn: bool, dev, dtype, layer: list[int], num_groups: int, payload: torch.Tensor):
    """Round trip over the shared-slot transport: n tokens, each with a choice on every expert
    group (so every group gets n rows); and one plain peer copy of the payload."""
    from afdserve.expert.placement import contiguous_placement

    experts = 8 * num_groups
    placement = contiguous_placement(experts, num_groups)
    k = t.top_k
    ids_TK = (torch.arange(k, device=dev) % num_groups * (experts // num_groups)).expand(n, k).contiguous()
    x_TD, w_TK = torch.randn(n, HIDDEN, device=dev).to(dtype), torch.ones(n, k, device=dev)
    t.begin_step([n] if attn else None)

    def ipc():
        layer[0] += 1
        if attn:
            t.combine_tokens(t.dispatch_tokens(layer[0], 0, x_TD, ids_TK, w_TK, placement))
        else:
            rows = t.receive_wait(t.receive(layer[0], 0))
            t.reply_wait(t.reply(layer[0], 0, [r.x_ND for r in rows]))

    peer_raw = t.outboxes[0].raw
    size = payload.numel()

    def peer_copy():
        if attn:
            peer_raw[-size:].copy_(payload)

    return {"afdserve_ipc": ipc, "peer_copy": peer_copy}


def run(m: int, n: int, min_kb: int = 16, max_mb: int = 16, iters: int = 100, device: str = "cuda",
        methods: list[str] | None = None) -> list[dict]:
    """Results as dicts (method, bytes, median_us, p99_us, gb_per_s), attention rank 0's view."""
    from afdserve.launcher import free_port

    world = m + n
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    args = (world, m, port, sizes_bytes(min_kb, max_mb), iters, device, list(methods or METHODS), queue)
    procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                return queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"transfer benchmark failed: ranks {dead} died (or timed out)") from None
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def utilisation_curve(results: list[dict], method: str = "afdserve_p2p") -> tuple[list[list[float]], float]:
    """(bytes, fraction of the best GB/s) for ``method``, made non-decreasing, and that best GB/s."""
    from afdserve.planner.measure_comm import isotonic

    rows = sorted((r["bytes"], r["gb_per_s"]) for r in results if r["method"] == method)
    best = max(g for _, g in rows)
    utils = isotonic([g / best for _, g in rows])
    top = max(utils)
    return [[float(b), u / top] for (b, _), u in zip(rows, utils)], best


def table(results: list[dict]) -> str:
    lines = [f"{'method':18s} {'bytes':>10s} {'median us':>10s} {'p99 us':>9s} {'GB/s':>7s}"]
    for r in results:
        lines.append(f"{r['method']:18s} {r['bytes']:10d} {r['median_us']:10.1f} {r['p99_us']:9.1f} "
                     f"{r['gb_per_s']:7.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attn", type=int, default=1, help="M attention ranks")
    ap.add_argument("--experts", type=int, default=1, help="N expert ranks")
    ap.add_argument("--min-kb", type=int, default=16)
    ap.add_argument("--max-mb", type=int, default=16)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = run(args.attn, args.experts, args.min_kb, args.max_mb, args.iters, args.device)
    with open(args.out, "w") as f:
        json.dump({"m": args.attn, "n": args.experts, "results": results,
                   "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                   "torch": torch.__version__, "commit": os.environ.get("AFDSERVE_COMMIT", "")}, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
