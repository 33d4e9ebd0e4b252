"""After a token is sampled: detokenize, check the stop conditions, build the outputs."""

from __future__ import annotations

from afdserve.core import CompletionOutput, Request, RequestOutput


def append_token(req: Request, token: int, logprobs: dict[int, float] | None, tokenizer,
                 eos_ids: set[int], max_model_len: int) -> str | None:
    """Add a sampled token; return the finish reason ("stop"/"length") or None."""
    req.output_token_ids.append(token)
    if logprobs is not None:
        req.output_logprobs.append(logprobs)
    p, n = req.params, len(req.output_token_ids)
    reason = None
    if n >= p.min_tokens:
        if token in p.stop_token_ids:
            reason, req.stop_reason = "stop", token
        elif not p.ignore_eos and token in eos_ids:
            reason = "stop"
    at_length = req.num_prompt_tokens + n >= min(req.max_total_tokens, max_model_len)  # pending tokens not counted
    if tokenizer is not None:
        reason = _update_text(req, tokenizer, final=reason is not None or at_length) or reason
    if reason is None and at_length:
        reason = "length"
    return reason


def detokenize_step(req: Request, tokenizer, final: bool = False) -> str:
    """The text the newest tokens add (vLLM's incremental scheme): decode a window of a few
    tokens before the new ones and keep what the new ones add, so each token costs O(window),
    not O(output). Text is held back while it ends in an incomplete character (U+FFFD), unless
    ``final``."""
    ids, skip = req.output_token_ids, req.params.skip_special_tokens
    before = tokenizer.decode(ids[req.detok_prefix:req.detok_read], skip_special_tokens=skip)
    after = tokenizer.decode(ids[req.detok_prefix:], skip_special_tokens=skip)
    if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
        return ""
    req.detok_prefix, req.detok_read = req.detok_read, len(ids)
    return after[len(before):]


def _update_text(req: Request, tokenizer, final: bool) -> str | None:
    """Extend the output text; on a stop string, cut the text there and return "stop"."""
    p = req.params
    old_len = len(req.output_text)
    req.output_text += detokenize_step(req, tokenizer, final)
    text = req.output_text
    if not p.stop or len(req.output_token_ids) < p.min_tokens or len(text) == old_len:
        return None
    search_from = max(0, old_len - max(len(s) for s in p.stop) + 1)
    hits = [(i, s) for s in p.stop if (i := text.find(s, search_from)) >= 0]
    if not hits:
        return None
    i, s = min(hits)
    req.output_text = text[: i + len(s)] if p.include_stop_str_in_output else text[:i]
    req.stop_reason = s
    return "stop"


def request_output(req: Request, index: int = 0) -> CompletionOutput:
    """Visible text holds back a trailing partial UTF-8 character until it completes."""
    text = req.output_text
    if not req.finished and text.endswith("\ufffd"):
        text = text.rstrip("\ufffd")
    return CompletionOutput(index=index, text=text, token_ids=list(req.output_token_ids),
                            finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                            logprobs=list(req.output_logprobs) if req.params.logprobs is not None else None)


def group_output(request_id: str, children: list[Request]) -> RequestOutput:
    """One RequestOutput for a request sampled ``n`` times (one child per sample)."""
    first = children[0]
    prompt_lps = None if first.params.prompt_logprobs is None else [None, *first.prompt_logprobs]
    return RequestOutput(request_id=request_id, prompt=first.prompt,
                         prompt_token_ids=list(first.prompt_token_ids),
                         outputs=[request_output(c, i) for i, c in enumerate(children)],
                         finished=all(c.finished for c in children), prompt_logprobs=prompt_lps)
