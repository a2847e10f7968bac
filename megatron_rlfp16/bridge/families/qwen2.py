"""Qwen2: Llama's layout plus biases on q/k/v (``arch.qkv_bias``, mapped by the shared attention table)."""
from megatron_rlfp16.bridge.families import Family
from megatron_rlfp16.bridge.families.common import attention, dense_mlp, embeddings_and_head, reject_sliding_window


def arch_fields(cfg):
    reject_sliding_window(cfg)
    return dict(qkv_bias=True)


def mappings(arch):
    assert arch.qkv_bias, "qwen2 checkpoints carry q/k/v biases"
    return [*embeddings_and_head(arch), *attention(arch), *dense_mlp()]


FAMILY = Family(name="qwen2", model_types=("qwen2",), arch_fields=arch_fields, mappings=mappings)
