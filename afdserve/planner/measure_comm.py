"""The M2N transport's utilisation curve: round trips of one attention leader and one expert
leader through ``afdserve.transport`` (the torch P2P transport: Gloo on CPU, NCCL with two
GPUs), in two local processes, for message sizes from a few KB to many MB.

Utilisation at a size is the throughput reached there over the best throughput measured:
the shape of the curve (per-message overheads) belongs to the transport, while the planner
multiplies it by the per-GPU network bandwidth of the deployment.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import statistics
import time

import torch


def measure_util_curve(hidden: int = 1024, min_bytes: int = 1024, max_bytes: int = 16 << 20,
                       backend: str = "gloo", iters: int = 5, timeout_s: float = 300.0
                       ) -> tuple[tuple[tuple[float, float], ...], float]:
    """((message bytes, utilisation), ...) ascending, and the best throughput in GB/s."""
    row_bytes = hidden * 4  # float32 rows on CPU; bf16 on GPU halves it, the byte sizes stay right
    if backend == "nccl":
        row_bytes = hidden * 2
    rows, n = [], max(1, min_bytes // row_bytes)
    while n * row_bytes <= max_bytes:
        rows.append(n)
        n *= 2
    # fork (CPU only) spares the children re-importing torch and afdserve; CUDA needs spawn
    ctx = mp.get_context("spawn" if backend == "nccl" or "fork" not in mp.get_all_start_methods() else "fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, rows, hidden, backend, iters, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = queue.get(timeout=timeout_s)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    # one round trip carries the rows out (x + ids + weights) and the x rows back
    tput = [(n * row_bytes, (2 * n * row_bytes + 8 * n) / t) for n, t in results]
    best = max(x for _, x in tput)
    utils = isotonic([x / best for _, x in tput])
    return tuple((float(size), u / max(utils)) for (size, _), u in zip(tput, utils)), best / 1e9


def isotonic(ys: list[float]) -> list[float]:
    """The closest non-decreasing sequence (pool adjacent violators): timing noise must not
    make a bigger message look slower than a smaller one."""
    blocks: list[list[float]] = []  # [mean, count]
    for y in ys:
        blocks.append([y, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, rows: list[int], hidden: int, backend: str, iters: int, queue) -> None:
    from afdserve.transport.base import Rows
    from afdserve.transport.groups import init_distributed
    from afdserve.transport.topology import Topology
    from afdserve.transport.torch_p2p import TorchP2PTransport

    if backend != "nccl":
        torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    topo = Topology(n_a=1, tp_a=1, n_e=1, tp_e=1)
    groups = init_distributed(topo, rank, backend, f"tcp://127.0.0.1:{port}", timeout_s=120.0,
                              device=f"cuda:{rank}" if backend == "nccl" else None)
    dtype = torch.bfloat16 if backend == "nccl" else torch.float32
    side = TorchP2PTransport.attn_side if rank == 0 else TorchP2PTransport.expert_side
    t = side(topo, rank, hidden, 1, dtype, groups.device, max(rows))
    results, layer = [], 0
    for n in rows:
        msg = Rows(torch.randn(n, hidden, dtype=dtype, device=groups.device),
                   torch.zeros(n, 1, dtype=torch.int32, device=groups.device),
                   torch.ones(n, 1, dtype=torch.float32, device=groups.device))
        times = []
        for _ in range(iters + 1):  # the first round trip is a warm-up
            times.append(_round_trip(t, rank, layer, msg))
            layer += 1
        results.append((n, statistics.median(times[1:])))
    if rank == 0:
        queue.put(results)
    groups.destroy()


def _round_trip(t, rank: int, layer: int, msg) -> float:
    t0 = time.perf_counter()
    if rank == 0:
        t.combine_wait(t.dispatch(layer, 0, [msg]))
    else:
        got = t.receive_wait(t.receive(layer, 0))
        t.reply_wait(t.reply(layer, 0, [got[0].x_ND]))
    if msg.x_ND.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0
