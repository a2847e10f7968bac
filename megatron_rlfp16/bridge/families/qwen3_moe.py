"""Qwen3-MoE: Qwen3 attention; every layer an MoE with a softmax router (``mlp.gate``) and gated
experts stored per expert on disk (``mlp.experts.{e}.{gate,up,down}_proj``)."""
from megatron_rlfp16.bridge.families.common import attention, embeddings_and_head, experts


def mappings(arch):
    return [
        *embeddings_and_head(arch),
        *attention(arch),
        *experts(router="mlp.gate.weight", expert="mlp.experts.*.",
                 gate="gate_proj.weight", up="up_proj.weight", down="down_proj.weight"),
    ]
