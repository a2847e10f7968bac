"""Qwen3-MoE: Qwen3 attention; every layer an MoE with a softmax router (``mlp.gate``) and gated
experts stored per expert on disk (``mlp.experts.{e}.{gate,up,down}_proj``)."""
from megatron_rlfp16.bridge.families import Family
from megatron_rlfp16.bridge.families.common import (
    attention, embeddings_and_head, experts, moe_fields, reject_sliding_window, require,
)
from megatron_rlfp16.models.hf_config import get_field


def arch_fields(cfg):
    reject_sliding_window(cfg)
    require(cfg, "mlp_only_layers", lambda v: not v, "[]")
    require(cfg, "decoder_sparse_step", lambda v: v is None or int(v) == 1, "1")
    return dict(
        qk_norm=True,
        # transformers >= 5 spells it num_local_experts; 4.x num_experts.
        **moe_fields(cfg, num_experts=int(cfg.get("num_local_experts") or get_field(cfg, "num_experts")),
                     ffn=int(get_field(cfg, "moe_intermediate_size")),
                     renormalize=bool(cfg.get("norm_topk_prob", True))),
    )


def mappings(arch):
    return [
        *embeddings_and_head(arch),
        *attention(arch),
        *experts(router="mlp.gate.weight", expert="mlp.experts.*.",
                 gate="gate_proj.weight", up="up_proj.weight", down="down_proj.weight"),
    ]


FAMILY = Family(name="qwen3_moe", model_types=("qwen3_moe",), arch_fields=arch_fields, mappings=mappings)
