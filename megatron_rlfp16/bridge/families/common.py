"""Mapping tables shared by the families: embeddings, attention, dense MLP, experts.

Every family file composes these; only the HF spellings that differ are passed in.
"""
from __future__ import annotations

from typing import List

from megatron_rlfp16.bridge.mappings import (
    QKV,
    ColumnParallel,
    GatedMLP,
    Mapping,
    Replicated,
    RowParallel,
    VocabParallel,
)
from megatron_rlfp16.models.hf_config import ConfigError, ModelArch

L = "decoder.layers.*."
H = "model.layers.*."


def embeddings_and_head(arch: ModelArch) -> List[Mapping]:
    # With tied embeddings the LM head *is* the embedding: a pipeline's last stage keeps its own
    # copy as output_layer.weight, imported from embed_tokens and never exported twice.
    head = "model.embed_tokens.weight" if arch.tie_embeddings else "lm_head.weight"
    return [
        VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        VocabParallel("output_layer.weight", head),
        Replicated("decoder.final_layernorm.weight", "model.norm.weight"),
    ]


def attention(arch: ModelArch) -> List[Mapping]:
    a = H + "self_attn."
    out: List[Mapping] = [
        Replicated(L + "input_layernorm.weight", H + "input_layernorm.weight"),
        QKV(L + "self_attention.linear_qkv.weight", q=a + "q_proj.weight", k=a + "k_proj.weight",
            v=a + "v_proj.weight"),
        RowParallel(L + "self_attention.linear_proj.weight", a + "o_proj.weight"),
        Replicated(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
    ]
    if arch.qkv_bias:
        out.append(QKV(L + "self_attention.linear_qkv.bias", q=a + "q_proj.bias", k=a + "k_proj.bias",
                       v=a + "v_proj.bias"))
    if arch.qk_norm:
        out += [
            Replicated(L + "self_attention.q_layernorm.weight", a + "q_norm.weight"),
            Replicated(L + "self_attention.k_layernorm.weight", a + "k_norm.weight"),
        ]
    return out


def dense_mlp() -> List[Mapping]:
    m = H + "mlp."
    return [
        GatedMLP(L + "mlp.linear_fc1.weight", gate=m + "gate_proj.weight", up=m + "up_proj.weight"),
        RowParallel(L + "mlp.linear_fc2.weight", m + "down_proj.weight"),
    ]


def experts(router: str, expert: str, gate: str, up: str, down: str) -> List[Mapping]:
    """MoE layer: ``router`` and ``expert`` are HF prefixes below ``model.layers.*.``; the expert
    prefix contains the expert-id wildcard."""
    e = L + "mlp.experts.local_experts.*."
    return [
        Replicated(L + "mlp.router.weight", H + router),
        GatedMLP(e + "linear_fc1.weight", gate=H + expert + gate, up=H + expert + up),
        RowParallel(e + "linear_fc2.weight", H + expert + down),
    ]


def family_mappings(*parts: List[Mapping]) -> List[Mapping]:
    return [m for part in parts for m in part]


# -- HF config checks the families share ------------------------------------------------------------


def reject_truthy(cfg, *fields: str, family: str) -> None:
    """Options the family's layout cannot express when set (e.g. Llama's ``attention_bias``)."""
    for field in fields:
        if cfg.get(field):
            raise ConfigError(f"config field {field!r}={cfg[field]!r} is not supported for {family}; supported: False")


def reject_sliding_window(cfg) -> None:
    """Sliding-window attention is not built: Qwen's ``use_sliding_window`` must be off, and a
    config without that switch (Mixtral, Mistral) must have ``sliding_window`` null."""
    if cfg.get("use_sliding_window"):
        raise ConfigError("config field 'use_sliding_window'=True is not supported; supported: False")
    if "use_sliding_window" not in cfg and cfg.get("sliding_window"):
        raise ConfigError(
            f"config field 'sliding_window'={cfg['sliding_window']!r} is not supported; supported: null"
        )


def require(cfg, field: str, ok, supported: str) -> None:
    """``ok(cfg.get(field))`` or a ``ConfigError`` naming the field, its value and ``supported``."""
    if not ok(cfg.get(field)):
        raise ConfigError(f"config field {field!r}={cfg.get(field)!r} is not supported; supported: {supported}")


def moe_fields(cfg, *, num_experts: int, ffn: int, renormalize: bool) -> dict:
    """The ``ModelArch`` MoE fields, with top-k checked against the expert count."""
    from megatron_rlfp16.models.hf_config import get_field

    topk = int(get_field(cfg, "num_experts_per_tok"))
    if not 1 <= topk <= num_experts:
        raise ConfigError(f"config field 'num_experts_per_tok'={topk} must be in [1, {num_experts}]")
    return dict(num_experts=num_experts, moe_topk=topk, moe_ffn_hidden_size=ffn, moe_renormalize=renormalize)
