"""``afdserve make-tiny``: a tiny random checkpoint in the Hugging Face hub layout, with a
working byte-level BPE tokenizer, so text goes in and comes out without any download."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from afdserve.config import ModelConfig
from afdserve.models.names import attn_names, expert_names, global_names

FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
_CORPUS = """The quick brown fox jumps over the lazy dog. Attention and experts live on different GPUs.
Mixture-of-experts models route every token to a few experts; the router picks the top k.
Hello world! How are you today? I am fine, thank you. Once upon a time there was a model
that served many requests at once, with paged caches, micro-batches and a ping-pong pipeline.
0 1 2 3 4 5 6 7 8 9 10 100 1000. def main(): return 42  # code, too. Lorem ipsum dolor sit amet."""


def _hf_config(family: str, vocab: int) -> dict:
    common = {"vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_experts_per_tok": 2, "max_position_embeddings": 512,
              "hidden_act": "silu", "tie_word_embeddings": False, "eos_token_id": 0,
              "bos_token_id": None, "torch_dtype": "float32"}
    if family == "mixtral":
        return common | {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                         "intermediate_size": 96, "num_local_experts": 8, "rms_norm_eps": 1e-5,
                         "rope_theta": 1e6, "sliding_window": None}
    qwen = common | {"moe_intermediate_size": 48, "intermediate_size": 128, "num_experts": 8,
                     "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "decoder_sparse_step": 1,
                     "mlp_only_layers": [], "use_sliding_window": False}
    if family == "qwen3_moe":
        return qwen | {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                       "head_dim": 32, "norm_topk_prob": True, "attention_bias": False}
    return qwen | {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                   "shared_expert_intermediate_size": 96, "norm_topk_prob": False, "qkv_bias": True}


def _random_tensors(cfg: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Weights scaled so activations stay O(1) and logits are well separated."""
    specs = list(global_names(cfg).values())
    for layer in range(cfg.num_layers):
        specs += attn_names(cfg, layer).values()
        for e in range(cfg.num_experts):
            specs += expert_names(cfg, layer, e).values()
    out = {}
    for hub_name, shape in specs:
        if len(shape) == 1:
            t = (1.0 if hub_name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn(shape, generator=gen)
        elif "embed_tokens" in hub_name:
            t = torch.randn(shape, generator=gen)
        else:
            gain = 4.0 if hub_name == "lm_head.weight" else 1.0
            t = torch.randn(shape, generator=gen) * gain / shape[1] ** 0.5
        out[hub_name] = t.contiguous()
    return out


def _save_weights(tensors: dict[str, torch.Tensor], out_dir: str, shards: int) -> None:
    if shards <= 1:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def _save_tokenizer(out_dir: str) -> int:
    """Train a small byte-level BPE on a built-in text; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out_dir)
    return tok.get_vocab_size()


def make_tiny(family: str, out_dir: str, seed: int = 0, shards: int = 1) -> str:
    """Write a tiny random ``family`` checkpoint with tokenizer into ``out_dir``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    os.makedirs(out_dir, exist_ok=True)
    vocab = _save_tokenizer(out_dir)
    hf = _hf_config(family, vocab)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    im_end = SPECIAL_TOKENS.index("<|im_end|>")
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [0, im_end], "do_sample": False}, f, indent=2)
    gen = torch.Generator().manual_seed(seed)
    _save_weights(_random_tensors(ModelConfig.from_hf_dict(hf), gen), out_dir, shards)
    return out_dir
