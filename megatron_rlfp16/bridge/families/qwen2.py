"""Qwen2: Llama's layout plus biases on q/k/v (``arch.qkv_bias``, mapped by the shared attention table)."""
from megatron_rlfp16.bridge.families.common import attention, dense_mlp, embeddings_and_head


def mappings(arch):
    assert arch.qkv_bias, "qwen2 checkpoints carry q/k/v biases"
    return [*embeddings_and_head(arch), *attention(arch), *dense_mlp()]
