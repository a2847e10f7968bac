"""One small declarative file per model family; ``mappings_for(arch)`` picks the table."""
from __future__ import annotations

from typing import Callable, Dict, List

from megatron_rlfp16.bridge.families import llama, mixtral, qwen2, qwen3, qwen3_moe
from megatron_rlfp16.bridge.mappings import Mapping
from megatron_rlfp16.models.hf_config import ModelArch

FAMILY_TABLES: Dict[str, Callable[[ModelArch], List[Mapping]]] = {
    "llama": llama.mappings,
    "qwen2": qwen2.mappings,
    "qwen3": qwen3.mappings,
    "qwen3_moe": qwen3_moe.mappings,
    "mixtral": mixtral.mappings,
}


def mappings_for(arch: ModelArch) -> List[Mapping]:
    if arch.family not in FAMILY_TABLES:
        raise ValueError(f"model family {arch.family!r} has no bridge; supported: {sorted(FAMILY_TABLES)}")
    return FAMILY_TABLES[arch.family](arch)
