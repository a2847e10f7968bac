"""Mixtral: Llama attention; MoE under ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up),
``w2`` (down) and top-k-then-softmax routing."""
from megatron_rlfp16.bridge.families import Family
from megatron_rlfp16.bridge.families.common import (
    attention, embeddings_and_head, experts, moe_fields, reject_sliding_window,
)
from megatron_rlfp16.models.hf_config import get_field


def arch_fields(cfg):
    reject_sliding_window(cfg)
    return moe_fields(cfg, num_experts=int(get_field(cfg, "num_local_experts")),
                      ffn=int(get_field(cfg, "intermediate_size")), renormalize=True)


def mappings(arch):
    return [
        *embeddings_and_head(arch),
        *attention(arch),
        *experts(router="block_sparse_moe.gate.weight", expert="block_sparse_moe.experts.*.",
                 gate="w1.weight", up="w3.weight", down="w2.weight"),
    ]


FAMILY = Family(name="mixtral", model_types=("mixtral",), arch_fields=arch_fields, mappings=mappings)
