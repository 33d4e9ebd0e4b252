"""Incremental detokenization gives the text of a full decode, token by token."""

from __future__ import annotations

import random

import pytest

from afdserve.core import Request, SamplingParams
from afdserve.output import append_token


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["qwen3_moe"])


def _feed(tokenizer, ids: list[int], **params) -> list[str]:
    req = Request("r", [1], SamplingParams(max_tokens=len(ids), ignore_eos=True, **params),
                  max_total_tokens=1 + len(ids))
    texts = []
    for token in ids:
        append_token(req, token, None, tokenizer, set(), 10**6)
        texts.append(req.output_text)
    return texts


@pytest.mark.parametrize("text", ["héllo wörld, 世界 and 🙂 emoji, ünïcödé  spaces\n\nand new lines",
                                  "The quick brown fox jumps over the lazy dog. " * 8])
def test_text_token_by_token_is_a_prefix_then_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    texts = _feed(tokenizer, ids)
    for i, got in enumerate(texts):
        assert tokenizer.decode(ids[: i + 1]).startswith(got)
        assert "\ufffd" not in got  # a character split over tokens is held back until complete
    assert texts[-1] == tokenizer.decode(ids) == text


def test_random_tokens_give_the_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            assert _feed(tokenizer, ids, skip_special_tokens=skip)[-1] == \
                tokenizer.decode(ids, skip_special_tokens=skip)
