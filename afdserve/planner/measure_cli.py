"""``afdserve profile``: measure k1..k4 for a model on this device (and the transport curve),
and write the profile file that ``afdserve plan --profile`` reads."""

from __future__ import annotations

import argparse
import os
import platform

from afdserve.planner.cli import handles_errors
from afdserve.planner.hardware import CATALOG, get_gpu, load_catalog
from afdserve.planner.models import load_shape
from afdserve.planner.perf_model import AttnCoeffs, ExpertCoeffs, allreduce_time_s
from afdserve.planner.profile import Profile, load_profile, save_profile


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset name or Hugging Face model directory (shapes only)")
    p.add_argument("--gpu", default=None, help="catalog GPU the numbers apply to (default: from the device name)")
    p.add_argument("--gpu-file", default=None, help="JSON/TOML file adding GPUs to the catalog")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--tp", default=None, help="tensor-parallel sizes whose per-GPU shard shapes are timed "
                   "(default: 1,2,4,8 on GPU, 1 on CPU); sizes not measured are scaled from the nearest one")
    p.add_argument("--batch-sizes", default=None, help="attention batch sizes (comma-separated)")
    p.add_argument("--seq-lens", default=None, help="attention context lengths (comma-separated)")
    p.add_argument("--token-counts", default=None, help="expert (token, expert) pair counts (comma-separated)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-comm", action="store_true", help="skip the transport utilisation curve")
    p.add_argument("--comm-backend", default="gloo", choices=["gloo", "nccl"], help="nccl needs two GPUs")
    p.add_argument("--comm-max-mb", type=float, default=16.0)
    p.add_argument("--out", default="profile.json", help="profile file (merged into when it exists)")


def _ints(spec: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(x) for x in spec.split(",")) if spec else default


def guess_gpu(device_name: str) -> str | None:
    """The catalog entry a torch device name refers to ("NVIDIA H20" -> "H20"), if any."""
    words = set(device_name.upper().replace("-", " ").split())
    for name in CATALOG:
        if name.split("-")[0].upper() in words:
            return name
    return None


@handles_errors
def cmd_profile(args: argparse.Namespace) -> int:
    """Measure attention and expert coefficients per tp, the transport curve; write the profile."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"cpu ({platform.processor() or platform.machine()})")
    gpu = args.gpu or guess_gpu(dev_name) or ("cpu" if device.type == "cpu" else None)
    if gpu is None:
        raise ValueError(f"cannot tell which catalog GPU {dev_name!r} is: pass --gpu NAME")
    base = load_profile(args.out) if os.path.isfile(args.out) else Profile(dev_name, gpu, str(dtype).split(".")[-1])
    attn, expert, route, samples = _measure_model(args, base, device, dtype, gpu)
    curve, link, backend = base.util_curve, base.link_gb_per_s, base.comm_backend
    if not args.no_comm:
        from afdserve.planner.measure_comm import measure_util_curve

        curve, link = measure_util_curve(max_bytes=int(args.comm_max_mb * 2 ** 20), backend=args.comm_backend)
        backend = args.comm_backend
        print(f"transport ({backend}): best {link:.2f} GB/s; utilisation " +
              ", ".join(f"{int(x) // 1024} KiB: {u:.2f}" for x, u in curve[::3]))
    meta = dict(base.meta) | {"torch": torch.__version__, "samples": samples,
                              "tp_allreduce": "added from the catalog's intra-node bandwidth (one device timed)"}
    save_profile(args.out, Profile(dev_name, gpu, base.dtype, attn, expert, curve, link, backend, meta, route))
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


def _measure_model(args: argparse.Namespace, base: Profile, device, dtype,
                   gpu: str) -> tuple[dict, dict, dict, dict]:
    """The profile's attention/expert tables with this model's tp sizes (re)measured, and the
    model's row split by expert group."""
    from afdserve.planner.measure import measure_attn, measure_expert, measure_route

    shape = load_shape(args.model)
    catalog_gpu = get_gpu(gpu, load_catalog(args.gpu_file)) if gpu != "cpu" else None
    on_gpu = device.type == "cuda"
    bs = _ints(args.batch_sizes, (8, 32, 128) if on_gpu else (1, 4, 16))
    ss = _ints(args.seq_lens, (256, 1024) if on_gpu else (64, 256))
    ts = _ints(args.token_counts, (16, 64, 256, 1024) if on_gpu else (4, 16, 64))
    attn, expert = dict(base.attn), dict(base.expert)
    attn[shape.name], expert[shape.name] = dict(attn.get(shape.name, {})), dict(expert.get(shape.name, {}))
    samples = dict(base.meta.get("samples", {}))
    for tp in _ints(args.tp, (1, 2, 4, 8) if on_gpu else (1,)):
        a, a_samples = measure_attn(shape, tp, bs, ss, device, dtype, args.iters)
        e, e_samples = measure_expert(shape, tp, ts, device, dtype, args.iters)
        attn[shape.name][tp], expert[shape.name][tp] = _with_allreduce(a, e, shape.row_bytes, tp, catalog_gpu)
        samples[f"{shape.name} tp={tp}"] = {"attn_b_s_seconds": a_samples, "expert_pairs_held_seconds": e_samples}
        print(f"{shape.name} tp={tp}: k1={a.k1_s_per_token:.3e} s/token + {a.k1_s_per_token_ctx:.3e} s/token/ctx, "
              f"k2={a.k2_s:.3e} s; k3={e.k3_s_per_token:.3e} s/pair, k4={e.k4_s_per_expert:.3e} s/expert, "
              f"overhead={e.overhead_s:.3e} s ({len(a_samples)} + {len(e_samples)} timings)")
    route = dict(base.route)
    route[shape.name], r_samples = measure_route(shape, (1, 2, 4), bs, device, dtype, args.iters)
    samples[f"{shape.name} route"] = {"groups_b_seconds": r_samples}
    print(f"{shape.name} row split: " + ", ".join(f"{g} groups {tok:.3e} s/token + {call:.3e} s"
                                                  for g, tok, call in route[shape.name].by_groups))
    return attn, expert, route, samples


def _with_allreduce(a: AttnCoeffs, e: ExpertCoeffs, row_bytes: int, tp: int, gpu) -> tuple[AttnCoeffs, ExpertCoeffs]:
    """One device times a TP shard's compute; add the all-reduce a tp group would do (from
    the catalog's intra-node bandwidth), once per layer on each side."""
    if tp == 1 or gpu is None:
        return a, e
    per_token = allreduce_time_s(row_bytes, tp, gpu.intra_gb_per_s, 0.0)
    latency = allreduce_time_s(0, tp, gpu.intra_gb_per_s, 10e-6)
    return (AttnCoeffs(a.k1_s_per_token + per_token, a.k1_s_per_token_ctx, a.k2_s + latency, a.source),
            ExpertCoeffs(e.k3_s_per_token + per_token, e.k4_s_per_expert, e.overhead_s + latency, e.source))
