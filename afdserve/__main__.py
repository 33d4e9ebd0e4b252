"""The ``afdserve`` command: generate, make-tiny, plan, simulate, profile, serve, bench."""

from __future__ import annotations

import argparse
import os
import sys

from afdserve.config import ConfigError, vllm_parallel_options
from afdserve.core import InvalidRequest

DEFAULT_TINY_FAMILY = "qwen3_moe"


def default_model_dir() -> str:
    """The built-in tiny model, written on first use under ~/.cache/afdserve."""
    from afdserve.tiny import make_tiny

    root = os.environ.get("AFDSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "afdserve"))
    path = os.path.join(root, f"tiny-{DEFAULT_TINY_FAMILY}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_tiny(DEFAULT_TINY_FAMILY, path)
    return path


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine and parallel options, vLLM's spelling where vLLM has one."""
    p.add_argument("--plan", default=None,
                   help="plan file from `afdserve plan`: sets the parallel options and max-num-seqs")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (the GPU when there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "half", "float32", "float"],
                   help="auto: the checkpoint's bfloat16/float16 on GPU (float16 for float32 checkpoints), "
                        "float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmark-skip-prefill", action="store_true",
                   help="benchmarks only: start decoding at once without computing the prompt's KV "
                        "(decode steps at a given context; the outputs are meaningless)")
    _add_batch_and_cache_args(p)
    _add_parallel_args(p)
    _add_run_args(p)
    _add_eplb_args(p)


def _add_batch_and_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: 256 on GPU, 64 on CPU")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step (default: 2048 on GPU, 512 on CPU)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of full blocks shared by requests' prefixes (default: on, as in vLLM)")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="KV cache size in GiB (default: what --gpu-memory-utilization leaves on GPU, 1 on CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of each GPU's memory a process may use (weights, KV cache, activations)")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", default=None, choices=["single", "afd", "colocated"],
                   help="single: one process; afd: attention and experts in separate processes; colocated: "
                        "one process per attention replica, each also holding 1/n of the experts (expert "
                        "parallel, tokens exchanged per layer) (default: afd when any parallel size is above 1)")
    p.add_argument("--attn-groups", "--data-parallel-size", "-dp", type=int, default=1, dest="attn_groups",
                   help="attention replicas (data parallel); with --layout colocated, the number of processes")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="vLLM's spelling: the tensor parallel size of attention and expert groups alike; "
                        "disaggregated, every group has its own GPUs: -tp 2 with one attention and one expert "
                        "group runs 4 processes")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="vLLM's spelling: with --data-parallel-size N, the colocated layout (experts split over "
                        "the N processes)")
    p.add_argument("--attn-tp", type=int, default=1, help="tensor parallel size inside an attention group")
    p.add_argument("--expert-groups", type=int, default=1, help="expert-parallel groups")
    p.add_argument("--expert-tp", type=int, default=1, help="tensor parallel size inside an expert group")
    p.add_argument("--micro-batches", type=int, default=1, help="ping-pong micro-batches m (1..4)")
    p.add_argument("--afd-transport", default="auto", choices=["auto", "ipc", "p2p"],
                   help="attention<->expert transport: ipc writes rows straight into the peer's memory (one "
                        "node; CUDA IPC on GPU, shared memory on CPU), p2p uses torch.distributed send/recv "
                        "(NCCL/Gloo, any nodes); auto: ipc when every group leader is on one host with CUDA")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """How steps run: weights, CUDA graphs, scheduling mode, timeouts."""
    p.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"],
                   help="dummy: random weights at the checkpoint's shapes (benchmarks, no download)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None,
                   help="decode batch sizes captured as CUDA graphs (per micro-batch when disaggregated); one "
                        "value N: the default ladder up to N (default: up to --max-num-seqs)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch the next step while the GPU runs this one (default: on for a "
                        "single-process GPU engine)")
    p.add_argument("--dist-timeout", type=float, default=120.0, dest="dist_timeout_s",
                   help="seconds before a collective or transfer with a silent peer fails (every process group)")
    p.add_argument("--router-skew", type=float, default=0.0,
                   help="Zipf exponent of a router bias skewing expert popularity (tests/benchmarks)")


def _add_eplb_args(p: argparse.ArgumentParser) -> None:
    """Expert load balancing (vLLM's flag names)."""
    p.add_argument("--enable-eplb", action="store_true", help="re-place experts by their live load")
    p.add_argument("--num-redundant-experts", type=int, default=0, help="extra expert slots for hot-expert copies")
    p.add_argument("--eplb-window-size", type=int, default=64, help="steps of expert-load statistics kept")
    p.add_argument("--eplb-step-interval", type=int, default=256, help="steps between re-placement checks")
    p.add_argument("--eplb-threshold", type=float, default=0.9,
                   help="re-place when balancedness (mean/max group load) falls below this")
    p.add_argument("--expert-load-file", default=None, help="saved expert loads [L, E] for a static placement")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM/make_config keywords from the engine flags (a plan file's values replace theirs)."""
    kwargs = _flag_kwargs(args)
    if getattr(args, "plan", None):
        from afdserve.planner.plan_file import load_plan

        try:
            kwargs |= load_plan(args.plan)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot use plan file {args.plan!r}: {e}") from e
    return kwargs


def _flag_kwargs(args: argparse.Namespace) -> dict:
    return vllm_parallel_options(dict(
        device=args.device, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb,
        enable_prefix_caching=args.enable_prefix_caching,
        gpu_memory_utilization=args.gpu_memory_utilization, attn_groups=args.attn_groups, attn_tp=args.attn_tp,
        expert_groups=args.expert_groups, expert_tp=args.expert_tp, micro_batches=args.micro_batches,
        layout=args.layout, afd_transport=args.afd_transport, router_skew=args.router_skew,
        load_format=args.load_format, enforce_eager=args.enforce_eager, dist_timeout_s=args.dist_timeout_s,
        enable_eplb=args.enable_eplb, num_redundant_experts=args.num_redundant_experts,
        eplb_window_size=args.eplb_window_size, eplb_step_interval=args.eplb_step_interval,
        eplb_threshold=args.eplb_threshold, expert_load_file=args.expert_load_file,
        benchmark_skip_prefill=args.benchmark_skip_prefill, async_scheduling=args.async_scheduling,
        cuda_graph_sizes=args.cuda_graph_sizes, tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel))


def cmd_generate(args: argparse.Namespace) -> int:
    from afdserve import LLM, SamplingParams

    model = args.model or default_model_dir()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    with LLM(model, show_progress=True, **engine_kwargs(args)) as llm:
        cfg = llm.config
        print(f"deployment: {describe_deployment(cfg.parallel)} on {cfg.device} ({cfg.dtype})", file=sys.stderr)
        for prompt in args.prompt:
            out = llm.generate(prompt, params)[0].outputs[0]
            print(f"prompt: {prompt!r}\noutput: {out.text!r}\ntokens: {out.token_ids} ({out.finish_reason})")
    return 0


def describe_deployment(p) -> str:
    if p.colocated:
        return (f"colocated: {p.attn_groups} process(es), each an attention replica and an expert group, "
                f"{p.micro_batches} micro-batch(es)")
    if not p.disaggregated:
        return "single process"
    return (f"afd: {p.attn_groups} attention group(s) x tp {p.attn_tp}, {p.expert_groups} expert group(s) "
            f"x tp {p.expert_tp}, {p.micro_batches} micro-batch(es)")


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from afdserve.tiny import make_tiny

    print(make_tiny(args.family, args.out, seed=args.seed, shards=args.shards))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline")
    g.add_argument("--model", default=None, help="Hugging Face model directory (default: built-in tiny model)")
    g.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    add_engine_args(g)
    g.set_defaults(func=cmd_generate, prompt_default=["Hello, world"])

    t = sub.add_parser("make-tiny", help="write a tiny random checkpoint with a tokenizer")
    t.add_argument("--family", required=True, choices=["mixtral", "qwen3_moe", "qwen2_moe"])
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--shards", type=int, default=1)
    t.set_defaults(func=cmd_make_tiny)

    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    """Sub-commands of packages that register themselves (planner, server, bench)."""
    import importlib

    for module in ("afdserve.planner.cli", "afdserve.server.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:
            continue  # a machine without that part's dependencies (e.g. no uvicorn) still runs the rest
        mod.register(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "prompt", "") is None:
        args.prompt = args.prompt_default
    try:
        return args.func(args)
    except (ConfigError, InvalidRequest) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
