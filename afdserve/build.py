"""Builds the single-process engine from an EngineConfig: weights, KV cache, scheduler."""

from __future__ import annotations

import torch
from tqdm import tqdm

from afdserve.config import ConfigError, EngineConfig
from afdserve.engine import Engine
from afdserve.kv_cache import allocate_kv_cache, blocks_needed, kv_bytes_per_block
from afdserve.models.loader import open_checkpoint
from afdserve.models.moe_model import AttentionModel, ExpertModel
from afdserve.runner import SerialExecutor
from afdserve.scheduler import Scheduler
from afdserve.tokenizer import eos_token_ids, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


CPU_KV_CACHE_GB = 1.0  # the KV budget on CPU unless kv_cache_memory_gb says otherwise


def gpu_kv_budget_bytes(total: int, free: int, utilization: float) -> int:
    """KV bytes a GPU can take: ``utilization`` of its memory, minus what is already in use
    (this process's weights, other processes), minus a reserve for activations and CUDA graphs
    (4% of the GPU, at least 2 GiB)."""
    reserve = max(2 * 2**30, int(0.04 * total))
    return int(utilization * total) - (total - free) - reserve


def kv_budget_bytes(cfg: EngineConfig, device: torch.device) -> int:
    """The KV cache budget: kv_cache_memory_gb when given; else, on GPU, what
    gpu_memory_utilization leaves after the weights already loaded; 1 GiB on CPU."""
    if cfg.cache.kv_cache_memory_gb is not None:
        return int(cfg.cache.kv_cache_memory_gb * 2**30)
    if device.type != "cuda":
        return int(CPU_KV_CACHE_GB * 2**30)
    free, total = torch.cuda.mem_get_info(device)
    budget = gpu_kv_budget_bytes(total, free, cfg.cache.gpu_memory_utilization)
    if budget <= 0:
        raise ConfigError(f"no GPU memory left for the KV cache: {(total - free) / 2**30:.1f} of "
                          f"{total / 2**30:.1f} GiB are in use after loading the weights, and "
                          f"gpu_memory_utilization={cfg.cache.gpu_memory_utilization} allows "
                          f"{cfg.cache.gpu_memory_utilization * total / 2**30:.1f} GiB; raise it, or spread the "
                          "model over more GPUs")
    return budget


def num_kv_blocks(cfg: EngineConfig, kv_heads: int, device: torch.device | str = "cpu") -> int:
    """Blocks from the memory budget, capped at what max_num_seqs full contexts can use."""
    bs = cfg.cache.block_size
    if cfg.cache.num_kv_blocks is not None:
        return cfg.cache.num_kv_blocks
    per_block = kv_bytes_per_block(cfg.model_config.num_layers, bs, kv_heads,
                                   cfg.model_config.head_dim, torch_dtype(cfg.dtype))
    by_memory = kv_budget_bytes(cfg, torch.device(device)) // per_block
    useful = cfg.scheduler.max_num_seqs * blocks_needed(cfg.max_model_len, bs)
    n = min(by_memory, useful)
    if n < blocks_needed(cfg.max_model_len, bs):
        raise ConfigError(f"the KV cache ({n} blocks of {bs} tokens) cannot hold one sequence of "
                          f"max_model_len={cfg.max_model_len}; raise kv_cache_memory_gb (or gpu_memory_utilization) "
                          "or lower max_model_len")
    return n


def make_scheduler(cfg: EngineConfig, num_blocks: int, micro_batches: int) -> Scheduler:
    return Scheduler(cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens, num_blocks,
                     cfg.cache.block_size, micro_batches=micro_batches,
                     skip_prefill=cfg.scheduler.benchmark_skip_prefill,
                     prefix_caching=cfg.cache.enable_prefix_caching)


def load_progress(total: int, desc: str, enabled: bool = True):
    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled, leave=False)


def build_local_engine(cfg: EngineConfig, show_progress: bool = False) -> Engine:
    """Attention and all experts in this process (the serial reference of AFD)."""
    mc, device = cfg.model_config, torch.device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, required=cfg.load_format != "dummy")
    ckpt = open_checkpoint(cfg.model, cfg.load_format, torch_dtype(cfg.dtype), device, cfg.seed)
    with load_progress(2 * mc.num_layers, "loading weights", show_progress) as bar:
        attn = AttentionModel(mc, ckpt, on_tensor=lambda: bar.update(1), router_skew=cfg.router_skew, seed=cfg.seed)
        experts = ExpertModel(mc, ckpt, [range(mc.num_experts)] * mc.num_layers, on_tensor=lambda: bar.update(1))
    ckpt.close()
    blocks = num_kv_blocks(cfg, mc.num_kv_heads, device)
    kv = allocate_kv_cache(mc.num_layers, blocks, cfg.cache.block_size, mc.num_kv_heads, mc.head_dim,
                           torch_dtype(cfg.dtype), device)
    sched = make_scheduler(cfg, blocks, micro_batches=1)
    executor = SerialExecutor(attn, experts, kv)
    if device.type == "cuda" and not cfg.enforce_eager:
        from afdserve.cuda_graphs import GraphedExecutor, capture_sizes

        executor = GraphedExecutor(executor, capture_sizes(cfg), cfg.max_model_len, cfg.cache.block_size)
    async_scheduling = cfg.scheduler.async_scheduling
    return Engine(attn, executor, sched, cfg.max_model_len, tokenizer,
                  eos_token_ids(cfg.model, mc, tokenizer), device=device, seed=cfg.seed,
                  async_scheduling=device.type == "cuda" if async_scheduling is None else async_scheduling)
