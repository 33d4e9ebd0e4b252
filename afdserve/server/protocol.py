"""Request and response bodies of the OpenAI-compatible API (OpenAI's fields plus vLLM's extras).

Requests ignore unknown fields (as vLLM does) but refuse the vLLM extras afdserve does not
implement (guided decoding, beam search, bad words): a silent no-op would hand
back unconstrained output. NaN/inf are refused; value ranges are checked by ``SamplingParams``,
whose ``InvalidRequest.param`` is mapped back to this API's field name."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from afdserve.core import InvalidRequest, SamplingParams

MAX_N = 128  # choices per prompt; bounds the work one request can queue
INT64 = 2**63


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(OpenAIBase):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(OpenAIBase):
    """Fields both generation endpoints share."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    # vLLM extras afdserve refuses when set (see the module docstring)
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    bad_words: Any = None
    use_beam_search: bool = False
    prompt_embeds: Any = None
    logits_processors: Any = None
    prompt_logprobs: int | None = Field(None, ge=0)  # completions only

    def check_common(self) -> None:
        """Refusals that SamplingParams cannot make: unsupported features, field combinations."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be in 1..{MAX_N}, got {self.n}", "n")
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
                     "bad_words", "use_beam_search", "prompt_embeds", "logits_processors"):
            if getattr(self, name) not in (None, False, [], {}):
                raise InvalidRequest(f"{name} is not supported by afdserve", name)
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidRequest("allowed_token_ids must not be empty", "allowed_token_ids")

    def truncate(self, prompt: tuple[list[int], str | None], max_model_len: int) -> tuple[list[int], str | None]:
        """vLLM's truncate_prompt_tokens: keep the last k of a (token ids, text) prompt's tokens
        (-1: max_model_len); a cut prompt keeps no text."""
        ids, text = prompt
        k = self.truncate_prompt_tokens
        k = max_model_len if k == -1 else k
        if k is None or len(ids) <= k:
            return ids, text
        return ids[len(ids) - k:], None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, defaults: dict,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's parameters; request fields left out take the model's generation defaults."""
        def pick(name: str, fallback):
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        return SamplingParams(
            n=self.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0), seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, logprobs=logprobs,
            presence_penalty=pick("presence_penalty", 0.0), frequency_penalty=pick("frequency_penalty", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0), logit_bias=self.logit_bias,
            allowed_token_ids=self.allowed_token_ids, prompt_logprobs=prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.best_of not in (None, self.n):
            raise InvalidRequest("best_of is not supported by afdserve (only best_of == n)", "best_of")
        if self.suffix:
            raise InvalidRequest("suffix is not supported by afdserve", "suffix")

    @property
    def wanted_prompt_logprobs(self) -> int | None:
        """Top entries per prompt token the engine must compute: for ``prompt_logprobs``, and for
        ``echo`` with ``logprobs`` (the prompt's tokens then come with logprobs, as in vLLM)."""
        asked = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(asked) if asked else None


class ChatMessageIn(OpenAIBase):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    functions: Any = None  # OpenAI's legacy function calling: refused like tools
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    echo: bool = False

    def check(self) -> None:
        self.check_common()
        if not self.messages:
            raise InvalidRequest("messages must contain at least one message", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs set to true", "top_logprobs")
        if self.tools and self.tool_choice != "none":
            raise InvalidRequest("tool calling is not supported by afdserve (only tool_choice \"none\": the tools "
                                 "are shown to the chat template, no call is parsed)", "tools")
        if self.echo:
            raise InvalidRequest("echo is not supported by afdserve for chat completions", "echo")
        if self.functions:
            raise InvalidRequest("function calling is not supported by afdserve", "functions")
        if self.prompt_logprobs is not None:
            raise InvalidRequest("prompt_logprobs is supported by /v1/completions only", "prompt_logprobs")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidRequest("response_format other than text is not supported by afdserve",
                                 "response_format")
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequest("continue_final_message needs add_generation_prompt set to false",
                                 "continue_final_message")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(OpenAIBase):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIBase):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None = None


class ChatMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    """A stream chunk's delta: only the fields it carries (OpenAI sends no ``"role": null``)."""

    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "afdserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
