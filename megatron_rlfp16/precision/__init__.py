"""Precision: one config for trainer and rollout precision, the FP16 optimizer step, FP16 headroom
checks and FP32 islands.

- :mod:`~megatron_rlfp16.precision.dtypes`: ``Precision``, the project's one dtype vocabulary.
- :mod:`~megatron_rlfp16.precision.config`: ``PrecisionConfig`` (Megatron model, DDP and optimizer
  settings and vLLM engine arguments from one object).
- :mod:`~megatron_rlfp16.precision.islands`: FP32 islands (``apply_fp32_lm_head``,
  ``promote_to_fp32``), one mechanism with one marker.
- :mod:`~megatron_rlfp16.precision.scaler`: one grad scaler shared by Megatron's sub-optimizers.
- :mod:`~megatron_rlfp16.precision.step`: ``OptimizerStep`` (skipped-step counters, loss-scale
  metrics, the stop at the loss-scale floor, checkpoint state).
- :mod:`~megatron_rlfp16.precision.guard`: ``OverflowGuard``.

See docs/fp16.md.
"""
from megatron_rlfp16.precision.config import (
    DEFAULT_BACKOFF_FACTOR,
    DEFAULT_GROWTH_FACTOR,
    DEFAULT_HYSTERESIS,
    DEFAULT_INITIAL_LOSS_SCALE,
    DEFAULT_LOSS_SCALE_WINDOW,
    DEFAULT_MIN_LOSS_SCALE,
    PrecisionConfig,
)
from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE, Precision, config_precision, dtype_name, parse_dtype
from megatron_rlfp16.precision.guard import (
    FP16_MAX,
    FP16_SMALLEST_NORMAL,
    FP16HeadroomWarning,
    ModuleStat,
    OverflowGuard,
)
from megatron_rlfp16.precision.islands import IslandKind, apply_fp32_lm_head, island_kind, promote_to_fp32
from megatron_rlfp16.precision.scaler import SharedGradScaler, install_grad_scaler
from megatron_rlfp16.precision.step import (
    METRIC_NAMES,
    LossScaleFloorError,
    NonFiniteGradientError,
    OptimizerStep,
)

__all__ = [
    "ACCUM_DTYPE",
    "IslandKind",
    "SharedGradScaler",
    "config_precision",
    "dtype_name",
    "install_grad_scaler",
    "island_kind",
    "parse_dtype",
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
