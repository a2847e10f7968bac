"""Mistral: Llama's layout under its own ``model_type`` (and an explicit ``head_dim`` in newer
checkpoints); sliding-window attention (Mistral 7B v0.1's ``sliding_window=4096``) is refused."""
from megatron_rlfp16.bridge.families import Family
from megatron_rlfp16.bridge.families.common import attention, dense_mlp, embeddings_and_head, reject_sliding_window


def arch_fields(cfg):
    reject_sliding_window(cfg)
    return {}


def mappings(arch):
    return [*embeddings_and_head(arch), *attention(arch), *dense_mlp()]


FAMILY = Family(name="mistral", model_types=("mistral",), arch_fields=arch_fields, mappings=mappings)
