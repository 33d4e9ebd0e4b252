"""Tokenizer loading (Hugging Face ``tokenizer.json`` through transformers) and the
end-of-sequence ids a model stops on."""

from __future__ import annotations

import json
import os

from afdserve.config import ConfigError, ModelConfig


def load_tokenizer(model_dir: str, required: bool = True):
    """The checkpoint's fast tokenizer; a clear error when the directory has none (None when
    not ``required``: token-id prompts still work, outputs have no text)."""
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer.model")):
        if not required:
            return None
        raise ConfigError(f"no tokenizer.json in {model_dir!r}")
    return AutoTokenizer.from_pretrained(model_dir)


def eos_token_ids(model_dir: str, cfg: ModelConfig, tokenizer) -> set[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer (vLLM's union)."""
    ids = set(cfg.eos_token_ids)
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
