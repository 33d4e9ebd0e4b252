"""Offline API as vLLM users know it: ``LLM(model=...).generate(prompts, SamplingParams())``."""

from __future__ import annotations

import itertools
from dataclasses import replace

from afdserve.build import build_local_engine
from afdserve.config import EngineConfig, make_config
from afdserve.core import InvalidRequest, RequestOutput, SamplingParams
from afdserve.output import group_output


class LLM:
    """A model ready to generate. Use as a context manager or call ``shutdown()``."""

    def __init__(self, model: str, show_progress: bool = False, **options):
        """``options``: device, dtype, seed, router_skew and any engine option by name
        (max_model_len, max_num_seqs, max_num_batched_tokens, block_size, num_kv_blocks,
        kv_cache_memory_gb, gpu_memory_utilization, attn_groups, attn_tp, expert_groups, expert_tp, micro_batches,
        layout, enable_eplb, num_redundant_experts, eplb_window_size, eplb_step_interval,
        eplb_threshold, expert_load_file)."""
        self.config = make_config(model, **options)
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

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order."""
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
            while self.engine.has_unfinished():
                self.engine.step()
            self._raise_request_errors(groups)
        except BaseException:
            self._abort_quietly(groups)
            raise
        return [group_output(rid, children) for rid, children in groups]

    def _add(self, prompt: str | list[int], p: SamplingParams):
        text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str) and self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer: give prompts as token ids", param="prompt")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
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


def _as_prompt_list(prompts) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return list(prompts)
