"""Precision: FP16 headroom checks and FP32 islands (see :mod:`megatron_rlfp16.precision.guard`)."""
from megatron_rlfp16.precision.guard import (
    FP16_MAX,
    FP16_SMALLEST_NORMAL,
    FP16HeadroomWarning,
    ModuleStat,
    OverflowGuard,
    promote_to_fp32,
)

__all__ = [
    "FP16_MAX",
    "FP16_SMALLEST_NORMAL",
    "FP16HeadroomWarning",
    "ModuleStat",
    "OverflowGuard",
    "promote_to_fp32",
]
