"""Measurements behind ``afdserve profile``: the engine's own layer functions
(``afdserve.layers``, and ``afdserve.kernels.experts.fused_experts`` on GPU) timed at a
model's per-GPU shapes with random weights, then k1..k4 fitted by least squares.

Attention (one layer, b decode tokens, context s each):  t = k1_tok·b + k1_ctx·b·s + k2
Experts (one layer, T (token, expert) pairs over c experts held):  t = k3·T + k4·c + overhead
Row split by expert group (``transport.route``, b tokens over g groups):  t = r_tok(g)·b + r(g)
Legend: T tokens, D hidden, H heads, G kv heads, Hd head dim, E experts held, F 2I, I intermediate.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from afdserve.layers.attention import AttnMeta, paged_attention, prepare_qkv
from afdserve.layers.basic import add_rms_norm, linear, rms_norm, rope_cos_sin
from afdserve.layers.moe import expert_ffn, route
from afdserve.planner.models import MoEShape
from afdserve.planner.perf_model import AttnCoeffs, ExpertCoeffs, RouteCoeffs

BLOCK_SIZE = 16


def median_time_s(fn: Callable[[], object], device: torch.device, warmup: int = 1, iters: int = 3) -> float:
    """Median wall time of ``fn`` (device-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_runner(shape: MoEShape, tp: int, b: int, s: int, device: torch.device,
                     dtype: torch.dtype) -> Callable[[], object]:
    """One decode step of one layer's attention half on a TP shard: norm, q/k/v, RoPE, KV
    write, paged attention over s cached tokens, o_proj, residual, norm, router."""
    hd, h = shape.head_dim, shape.hidden
    heads, kv_heads = shape.num_heads // tp, max(1, shape.num_kv_heads // tp)
    w = {name: torch.randn(*dims, device=device, dtype=dtype) * 0.02 for name, dims in {
        "wqkv": ((heads + 2 * kv_heads) * hd, h), "wo": (h, heads * hd),
        "gate": (shape.num_experts, h)}.items()}
    norm_D = torch.ones(h, device=device, dtype=dtype)
    per_seq = math.ceil((s + 1) / BLOCK_SIZE)
    k_cache, v_cache = (torch.randn(b * per_seq, BLOCK_SIZE, kv_heads, hd, device=device, dtype=dtype)
                        for _ in range(2))
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
    meta = AttnMeta(torch.full((b,), s, dtype=torch.int64, device=device),
                    torch.tensor([t[s // BLOCK_SIZE] * BLOCK_SIZE + s % BLOCK_SIZE for t in tables], device=device),
                    [1] * b, [s + 1] * b, tables)
    if device.type == "cuda":
        from afdserve.layers.attention import add_device_fields

        add_device_fields(meta, device)
    h_TD = torch.randn(b, h, device=device, dtype=dtype)

    def run() -> object:
        x_TD = rms_norm(h_TD, norm_D, 1e-6)
        rope = rope_cos_sin(meta.positions_T, hd, 10000.0)
        q = prepare_qkv(linear(x_TD, w["wqkv"]), heads, kv_heads, None, None, 1e-6, rope, k_cache, v_cache,
                        meta.slot_mapping_T)
        o_TD = linear(paged_attention(q, k_cache, v_cache, meta, hd ** -0.5).reshape(b, -1), w["wo"])
        return route(add_rms_norm(h_TD, o_TD, norm_D, 1e-6)[0], w["gate"], shape.top_k, True)

    return run


def expert_runner(shape: MoEShape, tp: int, pairs: int, held: int, device: torch.device,
                  dtype: torch.dtype) -> Callable[[], object]:
    """One layer's grouped expert FFN on a TP shard holding ``held`` experts, ``pairs`` rows."""
    inter = max(1, shape.expert_intermediate // tp)
    w13_EFD = torch.randn(held, 2 * inter, shape.hidden, device=device, dtype=dtype) * 0.02
    w2_EDI = torch.randn(held, shape.hidden, inter, device=device, dtype=dtype) * 0.02
    x_TD = torch.randn(pairs, shape.hidden, device=device, dtype=dtype)
    ids_TK = (torch.arange(pairs, device=device) % held).view(pairs, 1)
    w_TK = torch.ones(pairs, 1, device=device, dtype=torch.float32)
    ffn = expert_ffn
    if device.type == "cuda":
        from afdserve.kernels.experts import fused_experts as ffn  # the GPU path of the expert workers
    return lambda: ffn(x_TD, ids_TK, w_TK, w13_EFD, w2_EDI)


def fit_nonneg(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares y ≈ x @ c with c >= 0 (columns whose coefficient comes out negative are
    dropped and the rest refitted: a cost cannot be negative)."""
    keep = list(range(x.shape[1]))
    while True:
        c = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        if (c >= 0).all() or len(keep) == 1:
            out = np.zeros(x.shape[1])
            out[keep] = np.maximum(c, 0)
            return out
        keep.pop(int(np.argmin(c)))


def measure_attn(shape: MoEShape, tp: int, batch_sizes: tuple[int, ...], seq_lens: tuple[int, ...],
                 device: torch.device, dtype: torch.dtype, iters: int = 3) -> tuple[AttnCoeffs, list]:
    """Time the attention half over (b, s) and fit k1_tok, k1_ctx, k2."""
    samples = []
    for b in batch_sizes:
        for s in seq_lens:
            t = median_time_s(attention_runner(shape, tp, b, s, device, dtype), device, iters=iters)
            samples.append((b, s, t))
    x = np.array([[b, b * s, 1.0] for b, s, _ in samples], dtype=float)
    k1_tok, k1_ctx, k2 = fit_nonneg(x, np.array([t for *_, t in samples]))
    return AttnCoeffs(float(k1_tok), float(k1_ctx), float(k2), source="profile"), samples


def measure_expert(shape: MoEShape, tp: int, token_counts: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                   iters: int = 3, held_counts: tuple[int, ...] = (1, 2)) -> tuple[ExpertCoeffs, list]:
    """Time the expert FFN over (pairs, experts held) and fit k3, k4 and the per-group overhead."""
    samples = []
    for held in held_counts:
        for pairs in token_counts:
            t = median_time_s(expert_runner(shape, tp, pairs, held, device, dtype), device, iters=iters)
            samples.append((pairs, held, t))
    x = np.array([[p, c, 1.0] for p, c, _ in samples], dtype=float)
    k3, k4, overhead = fit_nonneg(x, np.array([t for *_, t in samples]))
    return ExpertCoeffs(float(k3), float(k4), float(overhead), source="profile"), samples


def route_runner(shape: MoEShape, b: int, groups: int, device: torch.device,
                 dtype: torch.dtype) -> Callable[[], object]:
    """The attention side's split of a micro-batch's rows over ``groups`` expert groups (what
    the disaggregated and colocated executors call per layer and micro-batch)."""
    from afdserve.expert.placement import contiguous_placement
    from afdserve.transport.reference import route as split_rows

    x_TD = torch.randn(b, shape.hidden, device=device, dtype=dtype)
    ids_TK = torch.randint(0, shape.num_experts, (b, shape.top_k), device=device)
    w_TK = torch.rand(b, shape.top_k, device=device)
    placement = contiguous_placement(shape.num_experts, groups)
    return lambda: split_rows(x_TD, ids_TK, w_TK, placement)


def measure_route(shape: MoEShape, groups: tuple[int, ...], batch_sizes: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype, iters: int = 3) -> tuple[RouteCoeffs, list]:
    """Time the row split per number of groups over b and fit seconds per token and per call."""
    fits, samples = [], []
    for g in groups:
        times = [(b, median_time_s(route_runner(shape, b, g, device, dtype), device, iters=iters))
                 for b in batch_sizes]
        samples += [(g, b, t) for b, t in times]
        per_token, per_call = fit_nonneg(np.array([[b, 1.0] for b, _ in times]), np.array([t for _, t in times]))
        fits.append((g, float(per_token), float(per_call)))
    return RouteCoeffs(tuple(fits)), samples
