"""Reads a Hugging Face ``config.json`` into a validated, family-neutral description of the model.

Everything the builder and the bridge need is read here once, so an unsupported option fails early
with the field name, its value and what is supported, instead of surfacing as a shape error later.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional

# model_type -> family name used by the bridge registry.
FAMILIES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
}
VOCAB_DIVISOR = 128
"""The vocabulary is padded to a multiple of lcm(128, tp) (Megatron-LM's ``make_vocab_size_divisible_by``).
For power-of-two TP sizes up to 128 the padded size does not depend on TP, so a distributed checkpoint
saved at one TP size loads at another."""


class ConfigError(ValueError):
    """An HF config that this package cannot build: names the field, the value and what is valid."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class ModelArch:
    family: str
    """One of ``FAMILIES`` values."""
    vocab_size: int
    """The HF vocabulary size (before Megatron's padding)."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    """Dense MLP width (for MoE families: each expert's width, see ``moe_ffn_hidden_size``)."""
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    num_experts: Optional[int] = None
    moe_topk: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_renormalize: bool = True
    """Top-k probabilities renormalized to sum to 1 (Mixtral; Qwen3-MoE ``norm_topk_prob``)."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def padded_vocab_size(self, tp: int) -> int:
        multiple = math.lcm(VOCAB_DIVISOR, tp)
        return -(-self.vocab_size // multiple) * multiple


def read_config_json(hf_dir: str) -> dict:
    """Loads ``hf_dir/config.json`` with errors that name the directory or file."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"--hf-dir {hf_dir!r} is not a directory")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{hf_dir!r} has no config.json: expected a Hugging Face model directory "
            "(config.json + *.safetensors)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _get(cfg: Mapping[str, Any], key: str, default: Any = dataclasses.MISSING) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is dataclasses.MISSING:
        raise ConfigError(f"config field {key!r} is missing (model_type={cfg.get('model_type')!r})")
    return default


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    # transformers >= 5 nests RoPE settings under rope_parameters; 4.x keeps rope_theta/rope_scaling.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConfigError(
            f"config field 'rope_parameters.rope_type'={rope_type!r} is not supported; supported: 'default'"
        )
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def parse_hf_config(cfg: Mapping[str, Any]) -> ModelArch:
    """Validates an HF config dict (or ``PretrainedConfig``) and returns its ``ModelArch``."""
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"config field 'model_type'={model_type!r} is not supported; supported: {sorted(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config field 'hidden_act'={act!r} is not supported; supported: 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if family == "llama" and cfg.get(flag):
            raise ConfigError(f"config field {flag!r}=True is not supported for llama; supported: False")
    if family == "mixtral" and cfg.get("sliding_window"):
        raise ConfigError(
            f"config field 'sliding_window'={cfg['sliding_window']!r} is not supported; supported: null"
        )
    if cfg.get("use_sliding_window"):
        raise ConfigError("config field 'use_sliding_window'=True is not supported; supported: False")
    hidden = int(_get(cfg, "hidden_size"))
    heads = int(_get(cfg, "num_attention_heads"))
    kv_heads = int(_get(cfg, "num_key_value_heads", heads))
    if heads % kv_heads:
        raise ConfigError(
            f"config field 'num_key_value_heads'={kv_heads} does not divide num_attention_heads={heads}"
        )
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    moe = {}
    if family == "qwen3_moe":
        if cfg.get("mlp_only_layers"):
            raise ConfigError(
                f"config field 'mlp_only_layers'={cfg['mlp_only_layers']!r} is not supported; supported: []"
            )
        if int(cfg.get("decoder_sparse_step", 1)) != 1:
            raise ConfigError(
                f"config field 'decoder_sparse_step'={cfg['decoder_sparse_step']!r} is not supported; "
                "supported: 1"
            )
        moe = dict(
            # transformers >= 5 spells it num_local_experts; 4.x num_experts.
            num_experts=int(cfg.get("num_local_experts") or _get(cfg, "num_experts")),
            moe_topk=int(_get(cfg, "num_experts_per_tok")),
            moe_ffn_hidden_size=int(_get(cfg, "moe_intermediate_size")),
            moe_renormalize=bool(cfg.get("norm_topk_prob", True)),
        )
    elif family == "mixtral":
        moe = dict(
            num_experts=int(_get(cfg, "num_local_experts")),
            moe_topk=int(_get(cfg, "num_experts_per_tok")),
            moe_ffn_hidden_size=int(_get(cfg, "intermediate_size")),
        )
    if moe and not 1 <= moe["moe_topk"] <= moe["num_experts"]:
        raise ConfigError(
            f"config field 'num_experts_per_tok'={moe['moe_topk']} must be in [1, {moe['num_experts']}]"
        )
    return ModelArch(
        family=family,
        vocab_size=int(_get(cfg, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_get(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=int(_get(cfg, "intermediate_size")),
        norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=int(_get(cfg, "max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "qwen3_moe"),
        **moe,
    )


def check_layout(arch: ModelArch, *, tp: int, pp: int, ep: int) -> None:
    """Errors for a parallel layout that cannot shard this model, naming both numbers."""
    if arch.num_heads % tp:
        raise ConfigError(f"tp={tp} does not divide num_attention_heads={arch.num_heads}")
    if arch.num_kv_heads % tp and tp % arch.num_kv_heads:
        raise ConfigError(
            f"tp={tp} and num_key_value_heads={arch.num_kv_heads}: one must divide the other"
        )
    if arch.ffn_hidden_size % tp and not arch.is_moe:
        raise ConfigError(f"tp={tp} does not divide intermediate_size={arch.ffn_hidden_size}")
    if arch.num_layers % pp:
        raise ConfigError(f"pp={pp} does not divide num_hidden_layers={arch.num_layers}")
    if ep > 1 and not arch.is_moe:
        raise ConfigError(f"ep={ep} needs an MoE model; {arch.family!r} has no experts (use ep=1)")
    if arch.is_moe:
        if arch.num_experts % ep:
            raise ConfigError(f"ep={ep} does not divide the number of experts {arch.num_experts}")
        if arch.moe_ffn_hidden_size % tp:
            raise ConfigError(
                f"tp={tp} does not divide the expert width moe_intermediate_size={arch.moe_ffn_hidden_size}"
            )
    if arch.padded_vocab_size(tp) % tp:
        raise ConfigError(f"tp={tp} does not divide the padded vocabulary {arch.padded_vocab_size(tp)}")
