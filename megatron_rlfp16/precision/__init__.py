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
import importlib

# Each public name and the submodule that defines it. The submodules are imported on first use
# (PEP 562), so that ``megatron_rlfp16.precision.dtypes`` (the CLI flags' choices) loads without torch.
_HOMES = {
    "config": ("DEFAULT_BACKOFF_FACTOR", "DEFAULT_GROWTH_FACTOR", "DEFAULT_HYSTERESIS",
               "DEFAULT_INITIAL_LOSS_SCALE", "DEFAULT_LOSS_SCALE_WINDOW", "DEFAULT_MIN_LOSS_SCALE",
               "PrecisionConfig"),
    "dtypes": ("ACCUM_DTYPE", "Precision", "config_precision", "dtype_name", "parse_dtype"),
    "guard": ("FP16_MAX", "FP16_SMALLEST_NORMAL", "FP16HeadroomWarning", "ModuleStat", "OverflowGuard"),
    "islands": ("IslandKind", "apply_fp32_lm_head", "island_kind", "promote_to_fp32"),
    "scaler": ("SharedGradScaler", "install_grad_scaler"),
    "step": ("METRIC_NAMES", "LossScaleFloorError", "NonFiniteGradientError", "OptimizerStep"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    if name != "ACCUM_DTYPE":
        globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_HOME_OF))


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
