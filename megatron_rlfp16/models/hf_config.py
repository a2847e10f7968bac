"""Reads a Hugging Face ``config.json`` into a validated, family-neutral description of the model.

Everything the builder and the bridge need is read here once, so an unsupported option fails early
with the field name, its value and what is supported, instead of surfacing as a shape error later.
The fields every family shares are read here; each family's own (biases, norms, experts, the
options it refuses) are read by its file in ``bridge/families/``, beside its mapping table.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional

VOCAB_DIVISOR = 128
"""The vocabulary is padded to a multiple of lcm(128, tp) (Megatron-LM's ``make_vocab_size_divisible_by``).
For power-of-two TP sizes up to 128 the padded size does not depend on TP, so a distributed checkpoint
saved at one TP size loads at another."""


class ConfigError(ValueError):
    """An HF config that this package cannot build: names the field, the value and what is valid."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class ModelArch:
    family: str
    """A family name of ``bridge/families`` (``FAMILIES`` maps HF model types onto them)."""
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


def get_field(cfg: Mapping[str, Any], key: str, default: Any = dataclasses.MISSING) -> Any:
    """``cfg[key]``, or ``default``; a missing required field is a ``ConfigError`` naming it."""
    return _get(cfg, key, default)


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
    """Validates an HF config dict (or ``PretrainedConfig``) and returns its ``ModelArch``: the shared
    fields here, the family's own from its ``Family.arch_fields``."""
    from megatron_rlfp16.bridge.families import family_for_model_type

    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    family = family_for_model_type(cfg.get("model_type"))
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config field 'hidden_act'={act!r} is not supported; supported: 'silu'")
    hidden = int(_get(cfg, "hidden_size"))
    heads = int(_get(cfg, "num_attention_heads"))
    kv_heads = int(_get(cfg, "num_key_value_heads", heads))
    if heads % kv_heads:
        raise ConfigError(
            f"config field 'num_key_value_heads'={kv_heads} does not divide num_attention_heads={heads}"
        )
    fields = dict(
        family=family.name,
        vocab_size=int(_get(cfg, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_get(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(_get(cfg, "intermediate_size")),
        norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=int(_get(cfg, "max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    fields.update(family.arch_fields(cfg))
    return ModelArch(**fields)


def __getattr__(name: str):
    # FAMILIES (HF model_type -> family name) is read from the family files on first use: they
    # import this module, so it cannot be built while this module is being imported.
    if name == "FAMILIES":
        from megatron_rlfp16.bridge.families import model_types

        return model_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
