"""Mixtral: Llama attention; MoE under ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up),
``w2`` (down) and top-k-then-softmax routing."""
from megatron_rlfp16.bridge.families.common import attention, embeddings_and_head, experts


def mappings(arch):
    return [
        *embeddings_and_head(arch),
        *attention(arch),
        *experts(router="block_sparse_moe.gate.weight", expert="block_sparse_moe.experts.*.",
                 gate="w1.weight", up="w3.weight", down="w2.weight"),
    ]
