"""From engine updates to OpenAI choices: text deltas that never take back what was sent,
logprobs in the completions and chat shapes, and usage."""

from __future__ import annotations

from dataclasses import dataclass, field

from afdserve.server.async_engine import Update
from afdserve.server.protocol import ChatLogprobEntry, ChatLogprobs, ChatTopLogprob, CompletionLogProbs, UsageInfo

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps to the same value


def hold_back(text: str, stops: list[str]) -> str:
    """The part of an unfinished output that is safe to show: without a trailing partial UTF-8
    character, and without a tail that may still grow into a stop string (which gets cut)."""
    text = text.rstrip("\ufffd")
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold]


@dataclass
class Choice:
    """One choice of a response, as sent so far."""

    index: int
    prompt_index: int
    stops: list[str]
    text: str = ""  # visible text already sent
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    final_text: str = ""
    prompt_logprobs: list[dict[int, float]] | None = None  # prompt tokens 1.. (asked for)
    prompt_logprob_ranks: list[int] | None = None

    def advance(self, upd: Update) -> str:
        """Take an update; return the new visible text (possibly empty)."""
        if upd.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_logprob_ranks = upd.prompt_logprobs, upd.prompt_logprob_ranks
        self.token_ids += upd.token_ids
        self.logprobs += upd.logprobs
        done = upd.finish_reason is not None
        visible = upd.text if done else hold_back(upd.text, self.stops)
        if done:
            self.finish_reason, self.stop_reason, self.final_text = upd.finish_reason, upd.stop_reason, upd.text
        if visible.startswith(self.text):
            delta, self.text = visible[len(self.text):], visible
        elif self.text.startswith(visible):
            delta = ""  # a shorter snapshot: what was sent stays sent
        else:  # the decoder rewrote earlier text; send from where they differ
            common = next((i for i, (a, b) in enumerate(zip(visible, self.text)) if a != b), 0)
            delta, self.text = visible[common:], visible
        return delta


def usage(prompt_lens: list[int], choices: list[Choice]) -> UsageInfo:
    """OpenAI's counts: each prompt once, every choice's tokens."""
    p, c = sum(prompt_lens), sum(len(ch.token_ids) for ch in choices)
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


class TokenText:
    """Token id -> its text, cached (the same ids come back often)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.cache[token_id] = self.tokenizer.decode([token_id])
        return s


def completion_logprobs(text_of: TokenText, token_ids: list[int], lps: list[dict[int, float] | None],
                        offset: int, top_n: int) -> CompletionLogProbs:
    """Completions shape: token strings, their logprobs, the ``top_n`` most likely of each entry
    plus the token itself, offsets into the text. An entry None (the first prompt token of an
    echo) gives nulls."""
    out = CompletionLogProbs()
    for t, lp in zip(token_ids, lps):
        s = text_of(t)
        out.tokens.append(s)
        out.text_offset.append(offset)
        offset += len(s)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(max(lp.get(t, MIN_LOGPROB), MIN_LOGPROB))
        out.top_logprobs.append({text_of(k): max(v, MIN_LOGPROB) for k, v in _top(lp, top_n) + [(t, lp[t])]})
    return out


def _top(lp: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(lp.items(), key=lambda kv: -kv[1])[:n]


def prompt_logprobs_entries(text_of: TokenText, prompt_ids: list[int], lps: list[dict[int, float]],
                            ranks: list[int], top_n: int) -> list[dict[str, dict] | None]:
    """vLLM's ``prompt_logprobs`` of a completion choice: None for the first token, then per
    token {token id: {"logprob", "rank", "decoded_token"}} for the token and the ``top_n`` most
    likely (rank 1: the most likely)."""
    out: list[dict[str, dict] | None] = [None]
    for t, lp, token_rank in zip(prompt_ids[1:], lps, ranks):
        top = _top(lp, top_n)
        rank = {k: i + 1 for i, (k, _) in enumerate(top)} | {t: token_rank}
        out.append({str(k): {"logprob": max(v, MIN_LOGPROB), "rank": rank.get(k), "decoded_token": text_of(k)}
                    for k, v in [(t, lp[t]), *top]})
    return out


def chat_logprobs(text_of: TokenText, token_ids: list[int], lps: list[dict[int, float]],
                  top_n: int) -> ChatLogprobs:
    """Chat shape: per token its string, logprob, UTF-8 bytes and the ``top_n`` most likely."""
    def entry(token_id: int, logprob: float) -> ChatTopLogprob:
        s = text_of(token_id)
        return ChatTopLogprob(token=s, logprob=max(logprob, MIN_LOGPROB), bytes=list(s.encode()))

    content = []
    for t, lp in zip(token_ids, lps):
        top = sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]
        e = entry(t, lp.get(t, MIN_LOGPROB))
        content.append(ChatLogprobEntry(**e.model_dump(), top_logprobs=[entry(k, v) for k, v in top]))
    return ChatLogprobs(content=content)
