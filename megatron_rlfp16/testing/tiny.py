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
