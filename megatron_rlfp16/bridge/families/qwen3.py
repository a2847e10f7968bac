"""Qwen3: Llama's layout plus per-head RMSNorm on queries and keys (``q_norm`` / ``k_norm``)."""
from megatron_rlfp16.bridge.families import Family
from megatron_rlfp16.bridge.families.common import attention, dense_mlp, embeddings_and_head, reject_sliding_window


def arch_fields(cfg):
    reject_sliding_window(cfg)
    return dict(qk_norm=True)


def mappings(arch):
    assert arch.qk_norm, "qwen3 checkpoints carry q_norm / k_norm"
    return [*embeddings_and_head(arch), *attention(arch), *dense_mlp()]


FAMILY = Family(name="qwen3", model_types=("qwen3",), arch_fields=arch_fields, mappings=mappings)
