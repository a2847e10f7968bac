"""Llama (and Llama-shaped checkpoints): GQA attention, gated SiLU MLP, RMSNorm, optional tied head."""
from megatron_rlfp16.bridge.families.common import attention, dense_mlp, embeddings_and_head


def mappings(arch):
    return [*embeddings_and_head(arch), *attention(arch), *dense_mlp()]
