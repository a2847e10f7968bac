"""Tiny random Hugging Face models of every supported family, made with transformers at run time.

Sizes are chosen to exercise the awkward cases cheaply: a vocabulary that is not a multiple of 128,
GQA with fewer KV heads than some TP sizes, an explicit ``head_dim`` (Qwen3), experts that split
evenly over EP=2. Head size 32 is the smallest vLLM's CPU attention supports.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
MOE_FAMILIES = ("qwen3_moe", "mixtral")


def tiny_config(family: str, **overrides):
    """A transformers config of ``family`` with tiny dimensions (vocab 300: not divisible by 128)."""
    import transformers

    common = dict(
        vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=48)
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    else:
        raise ValueError(f"family={family!r}; valid: {FAMILIES}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_model(family: str, out_dir: str, *, seed: int = 0, dtype: Optional[torch.dtype] = None,
                    **overrides) -> str:
    """Saves a random tiny ``family`` model to ``out_dir`` (safetensors + config.json); returns it.

    Biases and norm weights are randomized too (transformers initializes them to 0/1), so a mapping
    that dropped or swapped them could not pass a parity test by accident.
    """
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir


def hf_logits(hf_dir: str, input_ids: torch.Tensor, dtype=ACCUM_DTYPE) -> torch.Tensor:
    """Reference logits from a transformers forward pass."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids).logits


# -- a checkpoint the way real instruct models ship: tokenizer, chat template, several end ids -----

CHAT_SPECIALS = ("<pad>", "<s>", "</s>", "<|im_end|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_WORDS = tuple("0123456789") + ("what", "is", "+", "=", "?", "answer", "the", "be", "brief")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
CHAT_END_IDS = (3, 4)
"""``<|im_end|>`` and ``<|endoftext|>``: the end ids ``generation_config.json`` lists (the
tokenizer's own eos, ``</s>`` = 2, is a third)."""


def make_chat_tokenizer(out_dir: Optional[str] = None):
    """A word-level fast tokenizer (``tokenizers``, no download) with a Jinja chat template, saved
    to ``out_dir`` when given; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(CHAT_SPECIALS + CHAT_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=list(CHAT_SPECIALS[3:]), chat_template=CHAT_TEMPLATE,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def make_chat_model(out_dir: str, *, seed: int = 0, tie_word_embeddings: bool = True) -> str:
    """A tiny Llama whose vocabulary is :func:`make_chat_tokenizer`'s, saved with that tokenizer and a
    ``generation_config.json`` listing :data:`CHAT_END_IDS` (tied embeddings by default, as in most
    small instruct checkpoints)."""
    import json

    tokenizer = make_chat_tokenizer()
    make_tiny_model("llama", out_dir, seed=seed, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                    pad_token_id=0, tie_word_embeddings=tie_word_embeddings)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": list(CHAT_END_IDS), "pad_token_id": 0}, f)
    return out_dir
