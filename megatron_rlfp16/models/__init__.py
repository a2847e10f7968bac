"""Model construction: HF config -> Megatron ``TransformerConfig`` / ``GPTModel``."""
from megatron_rlfp16.models.builder import (
    build_model, causal_mask, layer_spec, sequence_multiple, transformer_config, uses_sequence_parallel,
)
from megatron_rlfp16.models.hf_config import (
    ConfigError,
    ModelArch,
    check_layout,
    parse_hf_config,
    read_config_json,
)

__all__ = [
    "FAMILIES", "ConfigError", "ModelArch", "build_model", "causal_mask", "check_layout",
    "layer_spec", "parse_hf_config", "read_config_json", "sequence_multiple", "transformer_config",
    "uses_sequence_parallel",
]


def __getattr__(name: str):
    if name == "FAMILIES":  # HF model_type -> family name, read from bridge/families on first use
        from megatron_rlfp16.models import hf_config

        return hf_config.FAMILIES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
