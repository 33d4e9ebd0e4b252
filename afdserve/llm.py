"""Offline API as vLLM users know it: ``LLM(model=...).generate(prompts, SamplingParams())``."""

from __future__ import annotations

import itertools
from dataclasses import replace

from tqdm import tqdm

from afdserve.build import build_local_engine
from afdserve.config import ConfigError, EngineConfig, make_config, vllm_parallel_options
from afdserve.core import InvalidRequest, RequestOutput, SamplingParams
from afdserve.output import group_output

Prompt = str | list[int] | dict  # text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": ...}


class LLM:
    """A model ready to generate. Use as a context manager or call ``shutdown()``."""

    def __init__(self, model: str, show_progress: bool = False, **options):
        """``options``: device, dtype, seed, router_skew and any engine option by name
        (max_model_len, max_num_seqs, max_num_batched_tokens, block_size, num_kv_blocks,
        kv_cache_memory_gb, gpu_memory_utilization, attn_groups, attn_tp, expert_groups, expert_tp, micro_batches,
        layout, enable_eplb, num_redundant_experts, eplb_window_size, eplb_step_interval,
        eplb_threshold, expert_load_file), and vLLM's tensor_parallel_size, data_parallel_size,
        enable_expert_parallel, trust_remote_code (accepted; no checkpoint code runs) and tokenizer
        (only the model's own)."""
        options.pop("trust_remote_code", None)
        tokenizer = options.pop("tokenizer", None)
        if tokenizer not in (None, model):
            raise ConfigError(f"tokenizer={tokenizer!r}: afdserve uses the model's own tokenizer ({model!r})")
        self.config = make_config(model, **vllm_parallel_options(options))
        if self.config.parallel.multi_process:
            from afdserve.frontend import AFDFrontend

            self.engine = AFDFrontend.spawn(self.config, show_progress)
        else:
            self.engine = build_local_engine(self.config, show_progress)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, config: EngineConfig, engine) -> LLM:
        """Wrap an engine or frontend that already runs (e.g. attached to torchrun workers)."""
        llm = cls.__new__(cls)
        llm.config, llm.engine, llm.tokenizer = config, engine, engine.tokenizer
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self):
        return self.tokenizer

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation (a list of {"role", "content"} messages) or several,
        rendered by the tokenizer's chat template (or ``chat_template``), then generated."""
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer, so no chat template", param="messages")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(
                conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **(chat_template_kwargs or {}))
            prompts.append({"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False),
                            "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or vLLM's prompt dicts); outputs in prompt
        order. ``use_tqdm``: a progress bar over finished prompts."""
        prompts = _as_prompt_list(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequest(f"{len(params)} sampling params for {len(prompts)} prompts",
                                 param="sampling_params")
        groups = []
        try:
            for prompt, p in zip(prompts, params):
                groups.append(self._add(prompt, p))
            with tqdm(total=len(groups), desc="Processed prompts", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished():
                    self.engine.step()
                    bar.update(sum(all(c.finished for c in cs) for _, cs in groups) - bar.n)
            self._raise_request_errors(groups)
        except BaseException:
            self._abort_quietly(groups)
            raise
        return [group_output(rid, children) for rid, children in groups]

    def _add(self, prompt: Prompt, p: SamplingParams):
        text, ids = _text_and_ids(prompt)
        if ids is None and self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer: give prompts as token ids", param="prompt")
        ids = self.tokenizer.encode(text) if ids is None else ids
        rid = str(next(self._ids))
        children = []
        try:
            for i in range(p.n):
                child_p = p if p.seed is None or i == 0 else replace(p, seed=p.seed + i)
                children.append(self.engine.add_request(f"{rid}#{i}", ids, child_p, prompt=text))
        except InvalidRequest:
            for c in children:
                self.engine.abort_request(c.request_id)
            raise
        return rid, children

    def _abort_quietly(self, groups) -> None:
        """Abort what is left of a failed generate call; a dead engine needs no abort."""
        for _, children in groups:
            for c in children:
                try:
                    self.engine.abort_request(c.request_id)
                except OSError:
                    return

    def _raise_request_errors(self, groups) -> None:
        errors = getattr(self.engine, "errors", {})
        for _, children in groups:
            for c in children:
                if c.request_id in errors:
                    raise errors.pop(c.request_id)

    def shutdown(self) -> None:
        """Stop the workers (if any) and release the model."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _text_and_ids(prompt: Prompt) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of one prompt; ids None when the text must be tokenized."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids"}
        if unknown or not prompt.keys() & {"prompt", "prompt_token_ids"}:
            raise InvalidRequest(f"a prompt dict takes 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}",
                                 param="prompt")
        ids = prompt.get("prompt_token_ids")
        return prompt.get("prompt"), None if ids is None else list(ids)
    return None, list(prompt)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return list(prompts)
