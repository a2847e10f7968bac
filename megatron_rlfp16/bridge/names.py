"""Megatron parameter names: local (per-rank) <-> canonical (global) form.

Megatron names parameters by their *local* position: on pipeline stage 1 the first layer is
``decoder.layers.0``, and expert-parallel ranks number their experts from 0. The bridge works on a
canonical form with the global layer index and global expert id, written in the local-spec spelling.
TransformerEngine specs spell a few parameters differently (norms fused into the following linear,
grouped-GEMM experts); they are translated here so that every family file lists one name set.
"""
from __future__ import annotations

import re
from typing import Optional

# TE spelling -> local-spec spelling (applied after layer/expert renumbering).
_TE_ALIASES = (
    (re.compile(r"\.self_attention\.linear_qkv\.layer_norm_weight$"), ".input_layernorm.weight"),
    (re.compile(r"\.self_attention\.linear_qkv\.layer_norm_bias$"), ".input_layernorm.bias"),
    (re.compile(r"\.mlp\.linear_fc1\.layer_norm_weight$"), ".pre_mlp_layernorm.weight"),
    (re.compile(r"\.mlp\.linear_fc1\.layer_norm_bias$"), ".pre_mlp_layernorm.bias"),
)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"\.mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
_SEQUENTIAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def is_skipped(name: str) -> bool:
    """State-dict entries that are not base weights: TE/FP8 metadata, and LoRA adapters (``.lora.``;
    ``megatron_rlfp16.lora`` exports them in PEFT's names)."""
    return name.endswith("._extra_state") or "._extra_state" in name or ".lora." in name


def to_canonical(name: str, *, layer_offset: int = 0, expert_offset: int = 0) -> Optional[str]:
    """Local Megatron name (local or TE spec) -> canonical global local-spec name; None to skip."""
    if is_skipped(name):
        return None
    m = _LAYER.match(name)
    if m:
        name = f"decoder.layers.{int(m.group(1)) + layer_offset}." + name[m.end():]
    m = _GROUPED_EXPERT.search(name)
    if m:
        name = name[: m.start()] + f".mlp.experts.local_experts.{m.group(2)}.{m.group(1)}.weight"
    m = _SEQUENTIAL_EXPERT.search(name)
    if m:
        e = int(m.group(1)) + expert_offset
        name = name[: m.start()] + f".mlp.experts.local_experts.{e}." + name[m.end():]
    for pattern, replacement in _TE_ALIASES:
        name = pattern.sub(replacement, name)
    return name


def to_te(canonical: str, *, has_moe: bool) -> str:
    """Canonical name -> TransformerEngine spelling (used to build TE-named state dicts).

    In TE MoE layers ``pre_mlp_layernorm`` stays a separate module (the router needs its output),
    so only dense layers fuse it into ``linear_fc1``; experts use the grouped-GEMM spelling.
    """
    name = canonical.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_")
    if not has_moe:
        name = name.replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_")
    m = re.search(r"\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$", name)
    if m:
        name = name[: m.start()] + f".mlp.experts.{m.group(2)}.weight{m.group(1)}"
    return name
