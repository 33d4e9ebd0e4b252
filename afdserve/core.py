"""Nouns of the engine: sampling parameters, requests, scheduled batches, outputs. No logic
beyond validation and derived properties."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class InvalidRequest(ValueError):
    """Bad request input. ``param`` names the offending field, as the OpenAI error shape does."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """vLLM's SamplingParams, the subset afdserve implements. Validated on construction."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # number of top logprobs per output token (0: only the sampled one)
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    repetition_penalty: float = 1.0  # tokens of the prompt or output: logit / p if > 0, else logit * p
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    allowed_token_ids: list[int] | None = None  # only these tokens can be sampled
    prompt_logprobs: int | None = None  # per prompt token (after the first): its logprob and the top ones

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.logit_bias = _token_bias(self.logit_bias)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = sorted(set(self.allowed_token_ids))
        self.top_k = 0 if self.top_k in (-1, None) else self.top_k
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be non-negative"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1 (off) or a positive integer"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must be non-negative"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in 0..20"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "must be in 0..20"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 10, "must be in (0, 10]"),
            ("logit_bias", all(-100 <= b <= 100 for b in self.logit_bias.values()), "values must be in [-100, 100]"),
            ("allowed_token_ids", self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
             "must not be empty"),
        ]
        ints = ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")
        for name in ints:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidRequest(f"{name} must be an integer, got {value!r}", param=name)
        for name, ok, why in checks:
            if not ok:
                raise InvalidRequest(f"{name} {why}, got {getattr(self, name)!r}", param=name)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens={self.min_tokens} must not exceed max_tokens={self.max_tokens}",
                                 param="min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a logit bias change the logits before sampling."""
        return self.penalizes or bool(self.logit_bias) or self.allowed_token_ids is not None

    @property
    def penalizes(self) -> bool:
        """Whether repetition, frequency or presence penalties apply (they read the tokens so far)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _token_bias(bias) -> dict[int, float]:
    """logit_bias with integer token ids (JSON gives the keys as strings)."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"logit_bias values must be numbers, got {value!r}", param="logit_bias")
        out[token] = float(value)
    return out


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence being generated. ``num_computed`` tokens already have KV in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    max_total_tokens: int = 0  # prompt + output limit (context length or prompt + max_tokens)
    prompt: str | None = None
    output_text: str = ""
    # incremental detokenization (output.py): output tokens before detok_prefix only give the
    # decoder context; those in [detok_prefix, detok_read) are already in output_text
    detok_prefix: int = 0
    detok_read: int = 0
    text_sent: int = 0  # characters of output_text a worker already reported to its frontend
    queued_at: float | None = None  # time.monotonic() when the scheduler got it
    queue_s: float | None = None  # seconds it waited before it was first scheduled
    # async scheduling: tokens sampled on the GPU whose value the host does not know yet (0 or 1);
    # they count in num_tokens, not in output_token_ids
    num_pending: int = 0
    # params.prompt_logprobs: entry i for prompt token i + 1 ({token: logprob} plus the top ones),
    # filled in order as the prefill reaches them
    prompt_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprob_ranks: list[int] = field(default_factory=list)  # each prompt token's rank (1: most likely)
    # prefix caching: hashes of the full blocks of the known tokens (content, not compute state),
    # and how many of the request's blocks are registered in the cache
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def all_token_ids(self) -> list[int]:
        """The tokens the host knows (without pending ones)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass
class ScheduledChunk:
    """``num_new`` tokens of one request, starting at position ``start``, computed this step."""

    request: Request
    start: int
    num_new: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so a new token is sampled."""
        return self.start + self.num_new == self.request.num_tokens


@dataclass
class StepPlan:
    """What the scheduler decided for one step: chunks grouped into micro-batches."""

    micro_batches: list[list[ScheduledChunk]]
    preempted: list[Request] = field(default_factory=list)

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return [c for mb in self.micro_batches for c in mb]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new for c in self.chunks)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # vLLM's shape: None for the first prompt token, then {token: logprob} (the token and the top
    # ones); None when not asked for
    prompt_logprobs: list[dict[int, float] | None] | None = None
