"""Llama (and Llama-shaped checkpoints): GQA attention, gated SiLU MLP, RMSNorm, optional tied head."""
from megatron_rlfp16.bridge.families import Family
from megatron_rlfp16.bridge.families.common import (
    attention, dense_mlp, embeddings_and_head, reject_sliding_window, reject_truthy,
)


def arch_fields(cfg):
    reject_truthy(cfg, "attention_bias", "mlp_bias", family="llama")
    reject_sliding_window(cfg)
    return {}


def mappings(arch):
    return [*embeddings_and_head(arch), *attention(arch), *dense_mlp()]


FAMILY = Family(name="llama", model_types=("llama",), arch_fields=arch_fields, mappings=mappings)
