"""One file per model family: its HF config translation beside its mapping table.

Each module in this package defines ``FAMILY = Family(...)`` (like a Megatron-Bridge model bridge):
the HF ``model_type`` values it reads, ``arch_fields(cfg)`` (the family's part of the HF config →
``ModelArch`` translation, refusing options it cannot build) and ``mappings(arch)`` (the declarative
Megatron ↔ HF table). Modules are discovered by name, so adding a family is one new file here plus
its test; nothing else lists families.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Dict, List, Mapping, Tuple

from megatron_rlfp16.models.hf_config import ConfigError, ModelArch


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    """The family's name (``ModelArch.family``)."""
    model_types: Tuple[str, ...]
    """HF ``config.json`` ``model_type`` values this family reads."""
    arch_fields: Callable[[Mapping[str, Any]], Dict[str, Any]]
    """HF config → the ``ModelArch`` fields that are the family's own (biases, norms, experts);
    raises ``ConfigError`` naming any option it does not support."""
    mappings: Callable[[ModelArch], list]
    """The Megatron ↔ HF mapping table for an ``arch`` of this family."""


def _discover() -> Dict[str, Family]:
    found: Dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "common":
            continue
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if not isinstance(family, Family):
            raise TypeError(f"{__name__}.{info.name} defines no FAMILY = Family(...)")
        if family.name in found:
            raise ValueError(f"two family modules are named {family.name!r}")
        found[family.name] = family
    return found


FAMILY_REGISTRY: Dict[str, Family] = _discover()
"""Family name -> ``Family``."""


def model_types() -> Dict[str, str]:
    """HF ``model_type`` -> family name, for every family."""
    out: Dict[str, str] = {}
    for family in FAMILY_REGISTRY.values():
        for model_type in family.model_types:
            if model_type in out:
                raise ValueError(f"model_type {model_type!r} is claimed by {out[model_type]!r} and {family.name!r}")
            out[model_type] = family.name
    return out


def family_for_model_type(model_type) -> Family:
    types = model_types()
    if model_type not in types:
        raise ConfigError(f"config field 'model_type'={model_type!r} is not supported; supported: {sorted(types)}")
    return FAMILY_REGISTRY[types[model_type]]


def mappings_for(arch: ModelArch) -> List:
    if arch.family not in FAMILY_REGISTRY:
        raise ValueError(f"model family {arch.family!r} has no bridge; supported: {sorted(FAMILY_REGISTRY)}")
    return FAMILY_REGISTRY[arch.family].mappings(arch)


FAMILY_TABLES = {name: family.mappings for name, family in FAMILY_REGISTRY.items()}
"""Family name -> mapping-table function (the name this table had before ``Family``)."""
