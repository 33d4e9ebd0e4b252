"""One config tree, built once (CLI or ``LLM(...)``) and passed down.

ModelConfig is read from a Hugging Face ``config.json``; the others hold engine knobs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

# architecture name in config.json -> our family name
SUPPORTED_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}


class ConfigError(ValueError):
    """A checkpoint or option that cannot be served, with a message saying why."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    qk_norm: bool
    qkv_bias: bool
    shared_expert_intermediate_size: int  # 0: no shared expert
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"  # the checkpoint's dtype (config.json's torch_dtype / dtype)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.top_k} must be in 1..{self.num_experts}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @staticmethod
    def from_dir(model_dir: str) -> ModelConfig:
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json in {model_dir!r}: expected a Hugging Face model directory")
        with open(path) as f:
            return ModelConfig.from_hf_dict(json.load(f))

    @staticmethod
    def from_hf_dict(hf: dict) -> ModelConfig:
        arch = (hf.get("architectures") or ["<none>"])[0]
        family = SUPPORTED_ARCHITECTURES.get(arch)
        if family is None:
            raise ConfigError(f"unsupported architecture {arch!r}; supported: "
                              f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        _check_all_layers_sparse(hf)
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return ModelConfig(
            family=family,
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            num_experts=hf["num_local_experts"] if family == "mixtral" else hf["num_experts"],
            top_k=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["intermediate_size"] if family == "mixtral" else hf["moe_intermediate_size"],
            norm_topk_prob=True if family == "mixtral" else bool(hf.get("norm_topk_prob", False)),
            qk_norm=family == "qwen3_moe",
            qkv_bias=bool(hf.get("qkv_bias", True) if family == "qwen2_moe" else hf.get("attention_bias", False)),
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe"
            else 0,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            bos_token_id=hf.get("bos_token_id"),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        )


def _rope_theta(hf: dict) -> float:
    """Plain RoPE only: old configs say rope_theta, new ones rope_parameters."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"unsupported RoPE scaling {rope_type!r}; only plain RoPE is supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_all_layers_sparse(hf: dict) -> None:
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ConfigError("dense (non-MoE) layers are not supported: mlp_only_layers must be empty "
                          "and decoder_sparse_step 1")
    if hf.get("use_sliding_window") or (hf.get("architectures", [""])[0] == "MixtralForCausalLM"
                                        and hf.get("sliding_window") is not None):
        raise ConfigError("sliding-window attention is not supported")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: derived from kv_cache_memory_gb or gpu_memory_utilization
    kv_cache_memory_gb: float | None = None  # None: from gpu_memory_utilization on GPU, 1 GiB on CPU
    gpu_memory_utilization: float = 0.9  # vLLM's meaning: the fraction of GPU memory this process may use
    # vLLM's automatic prefix caching (on by default, as in vLLM): full KV blocks of finished or
    # running requests are reused by requests that start with the same tokens
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ConfigError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # token budget of one step (chunked prefill splits longer prompts)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # benchmarks only: a prompt's KV is not computed (the cache keeps whatever it holds) and the
    # request starts decoding at once, so decode steps at large batch and context are timed
    # without paying for the prefill; outputs are meaningless
    benchmark_skip_prefill: bool = False
    # vLLM's --async-scheduling: the next step is scheduled and launched before the host has the
    # tokens of the one running (they stay on the GPU and feed it), so scheduling, input
    # preparation and output handling overlap the GPU. None: on for a single-process GPU engine.
    # Sampling (seeded requests draw from their own generator on the device), logprobs,
    # penalties and logit bias are computed on the device: no step needs the host's tokens.
    async_scheduling: bool | None = None
    # vLLM's --cuda-graph-sizes: decode batch sizes captured as CUDA graphs (per micro-batch when
    # disaggregated). None: this engine's ladder (``cuda_graphs.buckets``) up to the largest decode
    # batch (max_num_seqs, within the token budget); one value N: that ladder up to N; several:
    # exactly those sizes.
    cuda_graph_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.cuda_graph_sizes is not None:
            sizes = tuple(self.cuda_graph_sizes)
            if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
                raise ConfigError(f"cuda_graph_sizes must be positive integers, got {list(sizes)}")
            object.__setattr__(self, "cuda_graph_sizes", sizes)
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


AFD_TRANSPORTS = ("auto", "ipc", "p2p")


@dataclass(frozen=True)
class ParallelConfig:
    attn_groups: int = 1
    attn_tp: int = 1
    expert_groups: int = 1
    expert_tp: int = 1
    micro_batches: int = 1
    layout: str | None = None  # "single", "afd" or "colocated"; None: afd when any size > 1
    # M2N transport of the afd layout: "ipc" (shared slots, one node), "p2p" (torch.distributed
    # send/recv, any nodes) or "auto" (ipc when every group leader runs on one host with CUDA)
    afd_transport: str = "auto"

    def __post_init__(self) -> None:
        if self.layout not in (None, "single", "afd", "colocated"):
            raise ConfigError(f"layout must be 'single', 'afd' or 'colocated', got {self.layout!r}")
        if self.afd_transport not in AFD_TRANSPORTS:
            raise ConfigError(f"afd_transport must be one of {AFD_TRANSPORTS}, got {self.afd_transport!r}")
        for name in ("attn_groups", "attn_tp", "expert_groups", "expert_tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.micro_batches <= 4:
            raise ConfigError(f"micro_batches must be in 1..4, got {self.micro_batches}")
        if self.layout == "colocated":
            if self.attn_tp != 1 or self.expert_tp != 1:
                raise ConfigError("the colocated layout runs one process per GPU holding attention and its share of "
                                  "the experts; tensor parallelism inside it is not supported (attn_tp and expert_tp "
                                  "must be 1)")
            if self.micro_batches != 1:
                raise ConfigError("the colocated layout runs one micro-batch per step (overlapping two batches is "
                                  f"not implemented); micro_batches must be 1, got {self.micro_batches}")
            # vLLM's DP + expert parallel: one expert group per DP rank; filled in here, so a
            # colocated config always reads expert_groups == attn_groups
            if self.expert_groups == 1:
                object.__setattr__(self, "expert_groups", self.attn_groups)
            if self.expert_groups != self.attn_groups:
                raise ConfigError(f"the colocated layout has one expert group per attention replica: expert_groups "
                                  f"({self.expert_groups}) must equal attn_groups ({self.attn_groups}) or be left at 1")

    @property
    def disaggregated(self) -> bool:
        """Attention and experts in separate processes (layout "afd")."""
        sizes = (self.attn_groups, self.attn_tp, self.expert_groups, self.expert_tp, self.micro_batches)
        if self.layout == "single" and sizes != (1, 1, 1, 1, 1):
            raise ConfigError("layout 'single' runs one process: all parallel sizes must be 1")
        return self.layout == "afd" or (self.layout is None and sizes != (1, 1, 1, 1, 1))

    @property
    def colocated(self) -> bool:
        """One process per attention replica, each also holding an expert group (layout "colocated")."""
        return self.layout == "colocated"

    @property
    def multi_process(self) -> bool:
        """Worker processes behind a frontend (afd or colocated) rather than one in-process engine."""
        return self.colocated or self.disaggregated


@dataclass(frozen=True)
class EplbConfig:
    """Expert load balancing (vLLM's flag names): redundant expert slots, the load window
    and when to re-place experts while serving."""

    enable_eplb: bool = False
    num_redundant_experts: int = 0  # extra expert slots over all expert groups
    eplb_window_size: int = 64  # steps of load statistics kept
    eplb_step_interval: int = 256  # steps between re-placement checks
    eplb_threshold: float = 0.9  # re-place when balancedness (mean/max group load) is below
    expert_load_file: str | None = None  # static placement at start from saved loads [L, E]

    def __post_init__(self) -> None:
        if self.num_redundant_experts < 0:
            raise ConfigError(f"num_redundant_experts must be >= 0, got {self.num_redundant_experts}")
        if self.eplb_window_size < 1 or self.eplb_step_interval < 1:
            raise ConfigError("eplb_window_size and eplb_step_interval must be >= 1")

    @property
    def replicated(self) -> bool:
        """Whether experts use per-layer replica placements instead of one fixed home."""
        return self.enable_eplb or self.num_redundant_experts > 0 or self.expert_load_file is not None


@dataclass(frozen=True)
class EngineConfig:
    model: str
    model_config: ModelConfig
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eplb: EplbConfig = field(default_factory=EplbConfig)
    router_skew: float = 0.0  # Zipf exponent of a router bias that skews expert popularity (0: off)
    load_format: str = "safetensors"  # or "dummy": random weights at the checkpoint's shapes (benchmarks)
    enforce_eager: bool = False  # vLLM's flag: no CUDA graphs (GPU decode steps replay captured graphs)
    dist_timeout_s: float = 120.0  # SGLang's --dist-timeout: every process group's timeout (a hung peer -> error)

    def __post_init__(self) -> None:
        if self.load_format not in ("safetensors", "dummy"):
            raise ConfigError(f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout_s}")

    def agreement(self) -> dict:
        """What every rank of one deployment must be started with alike (torchrun starts each
        node with its own flags): all but what may differ per node (the model's and the load
        file's local paths, the device, memory budgets, timeouts); the load file by its contents."""
        fields = _flatten(dataclasses.asdict(self))
        for key in ("model", "device", "dist_timeout_s", "cache.gpu_memory_utilization", "cache.kv_cache_memory_gb"):
            del fields[key]
        path = fields.pop("eplb.expert_load_file")
        if path is not None and os.path.isfile(path):
            with open(path, "rb") as f:
                fields["eplb.expert_load_file sha256"] = hashlib.sha256(f.read()).hexdigest()
        return fields

    @property
    def max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        if self.scheduler.max_model_len is None:
            return limit
        if self.scheduler.max_model_len > limit:
            raise ConfigError(f"max_model_len={self.scheduler.max_model_len} exceeds the model's "
                              f"max_position_embeddings={limit}")
        return self.scheduler.max_model_len


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


_SECTIONS = {"cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig, "eplb": EplbConfig}
# vLLM-like batch limits on a GPU (its API server's token budget: the disaggregated transport's
# buffers scale with it); the CPU keeps SchedulerConfig's small ones (64 sequences, 512 tokens)
GPU_SCHEDULER_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 2048}
DTYPE_NAMES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
               "half": "float16"}  # vLLM's --dtype spellings, plus "auto"


def vllm_parallel_options(options: dict) -> dict:
    """vLLM's parallel keywords in this engine's terms (a copy): ``tensor_parallel_size`` is the
    TP size of attention and expert groups alike, ``data_parallel_size`` the attention replicas,
    ``enable_expert_parallel`` the colocated layout."""
    options = dict(options)
    tp = options.pop("tensor_parallel_size", None)
    if tp is not None:
        if (options.get("attn_tp", 1), options.get("expert_tp", 1)) != (1, 1):
            raise ConfigError("give either tensor_parallel_size or attn_tp/expert_tp, not both")
        options["attn_tp"] = options["expert_tp"] = tp
    dp = options.pop("data_parallel_size", None)
    if dp is not None:
        if options.get("attn_groups", 1) not in (1, dp):
            raise ConfigError("give either data_parallel_size or attn_groups, not both")
        options["attn_groups"] = dp
    if options.pop("enable_expert_parallel", False):
        if options.get("layout") not in (None, "colocated"):
            raise ConfigError(f"enable_expert_parallel selects the colocated layout; it conflicts with layout "
                              f"{options['layout']}")
        options["layout"] = "colocated"
    return options


def resolve_device(device: str) -> str:
    """``auto``: ``$AFDSERVE_DEVICE`` when set (the test suite sets cpu), else the GPU when torch
    sees one, else the CPU."""
    if device != "auto":
        return device
    if os.environ.get("AFDSERVE_DEVICE"):
        return os.environ["AFDSERVE_DEVICE"]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str, model_config: ModelConfig) -> str:
    """vLLM's ``auto`` on a GPU: the checkpoint's bfloat16 or float16, float16 for a float32
    checkpoint. On the CPU ``auto`` is float32 (the CPU path is the reference one)."""
    if dtype == "auto":
        if not device.startswith("cuda"):
            return "float32"
        return {"bfloat16": "bfloat16"}.get(model_config.torch_dtype, "float16")
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose auto or one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def resolve_model(model: str, load_format: str = "safetensors") -> str:
    """A local model directory, or a Hugging Face Hub id (``org/name``) fetched into the Hub
    cache like vLLM does (only the config and tokenizer for ``load_format="dummy"``)."""
    if os.path.isdir(model) or model.count("/") != 1 or model.startswith((".", "/", "~")):
        return model
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return model
    patterns = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
    if load_format != "dummy":
        patterns.append("*.safetensors")
    try:
        return snapshot_download(model, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 -- no network, unknown repo, gated repo: say which
        raise ConfigError(f"{model!r} is not a local directory and could not be fetched from the Hugging Face "
                          f"Hub: {type(e).__name__}: {e}") from e


def make_config(model: str, device: str = "auto", dtype: str = "auto", seed: int = 0,
                router_skew: float = 0.0, load_format: str = "safetensors", enforce_eager: bool = False,
                dist_timeout_s: float = 120.0, **options) -> EngineConfig:
    """The config tree from flat keywords: any field of CacheConfig, SchedulerConfig,
    ParallelConfig or EplbConfig by name (the CLI's flags have the same names)."""
    device = resolve_device(device)
    for key, on_gpu in GPU_SCHEDULER_DEFAULTS.items():  # None or left out: the device's default
        if options.get(key) is None:
            options.pop(key, None)
            if device.startswith("cuda"):
                options[key] = on_gpu
    sections: dict[str, dict] = {name: {} for name in _SECTIONS}
    for key, value in options.items():
        owner = next((name for name, cls in _SECTIONS.items() if key in cls.__dataclass_fields__), None)
        if owner is None:
            raise ConfigError(f"unknown engine option {key!r}")
        sections[owner][key] = value
    model = resolve_model(model, load_format)
    model_config = ModelConfig.from_dir(model)
    dtype = resolve_dtype(dtype, device, model_config)
    cfg = EngineConfig(model=model, model_config=model_config, device=device, dtype=dtype, seed=seed,
                       router_skew=router_skew, load_format=load_format, enforce_eager=enforce_eager,
                       dist_timeout_s=dist_timeout_s, **{k: _SECTIONS[k](**v) for k, v in sections.items()})
    cfg.max_model_len  # noqa: B018 -- validates max_model_len now, not at the first request
    blocks = cfg.cache.num_kv_blocks
    if blocks is not None and blocks * cfg.cache.block_size < cfg.max_model_len:
        raise ConfigError(f"num_kv_blocks={blocks} blocks of {cfg.cache.block_size} tokens cannot hold one sequence "
                          f"of max_model_len={cfg.max_model_len}; raise num_kv_blocks or lower max_model_len")
    if cfg.parallel.colocated and cfg.eplb.enable_eplb:
        raise ConfigError("live expert re-placement (enable_eplb) is not supported with the colocated layout yet; "
                          "use num_redundant_experts or expert_load_file for a static placement")
    if cfg.parallel.colocated and cfg.parallel.attn_groups > cfg.model_config.num_experts:
        raise ConfigError(f"the colocated layout gives each of its attn_groups (--data-parallel-size) "
                          f"{cfg.parallel.attn_groups} processes a share of the experts, but the model has only "
                          f"{cfg.model_config.num_experts}")
    if cfg.parallel.multi_process and cfg.scheduler.async_scheduling:
        raise ConfigError("async_scheduling is supported by the single-process engine only; the disaggregated "
                          "and colocated layouts step synchronously (drop --async-scheduling)")
    if cfg.parallel.expert_groups > cfg.model_config.num_experts:
        raise ConfigError(f"expert_groups={cfg.parallel.expert_groups} exceeds the model's "
                          f"{cfg.model_config.num_experts} experts")
    return cfg
