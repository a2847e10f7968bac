"""Precision: one config for trainer and rollout precision, the FP16 optimizer step, FP16 headroom
checks and FP32 islands.

- :mod:`~megatron_rlfp16.precision.config`: ``Precision``, ``PrecisionConfig`` (Megatron model,
  DDP and optimizer settings and vLLM engine arguments from one object), ``apply_fp32_lm_head``.
- :mod:`~megatron_rlfp16.precision.step`: ``OptimizerStep`` (skipped-step counters, loss-scale
  metrics, the stop at the loss-scale floor, checkpoint state).
- :mod:`~megatron_rlfp16.precision.guard`: ``OverflowGuard`` and ``promote_to_fp32``.

See docs/fp16.md.
"""
from megatron_rlfp16.precision.config import (
    DEFAULT_BACKOFF_FACTOR,
    DEFAULT_GROWTH_FACTOR,
    DEFAULT_HYSTERESIS,
    DEFAULT_INITIAL_LOSS_SCALE,
    DEFAULT_LOSS_SCALE_WINDOW,
    DEFAULT_MIN_LOSS_SCALE,
    Precision,
    PrecisionConfig,
    apply_fp32_lm_head,
)
from megatron_rlfp16.precision.guard import (
    FP16_MAX,
    FP16_SMALLEST_NORMAL,
    FP16HeadroomWarning,
    ModuleStat,
    OverflowGuard,
    promote_to_fp32,
)
from megatron_rlfp16.precision.step import (
    METRIC_NAMES,
    LossScaleFloorError,
    NonFiniteGradientError,
    OptimizerStep,
)

__all__ = [
    "DEFAULT_BACKOFF_FACTOR",
    "DEFAULT_GROWTH_FACTOR",
    "DEFAULT_HYSTERESIS",
    "DEFAULT_INITIAL_LOSS_SCALE",
    "DEFAULT_LOSS_SCALE_WINDOW",
    "DEFAULT_MIN_LOSS_SCALE",
    "FP16_MAX",
    "FP16_SMALLEST_NORMAL",
    "FP16HeadroomWarning",
    "LossScaleFloorError",
    "METRIC_NAMES",
    "ModuleStat",
    "NonFiniteGradientError",
    "OptimizerStep",
    "OverflowGuard",
    "Precision",
    "PrecisionConfig",
    "apply_fp32_lm_head",
    "promote_to_fp32",
]
