"""``Precision`` and ``PrecisionConfig``: one object decides the precision of trainer AND rollout.

Why one object: the point of this project (Qi et al. 2025, "Defeating the Training-Inference
Mismatch via FP16", https://arxiv.org/abs/2510.26788) is that the trainer's log-probs match the
rollout engine's when both run FP16. That only holds if Megatron's ``TransformerConfig``, Megatron's
``OptimizerConfig`` and vLLM's engine arguments all say the same thing, and the settings live in
three libraries with three spellings (``fp16=True``, ``params_dtype=torch.float16``,
``dtype="float16"``). ``PrecisionConfig`` is the single source: each consumer gets its settings
from one method, so the two sides cannot drift apart silently.

=========================  ====================================================================
consumer                   method
=========================  ====================================================================
Megatron TransformerConfig ``transformer_overrides()`` -> ``build_model(config_overrides=...)``
Megatron model (FP32 head) ``prepare_model(model)``, after ``build_model``, before DDP
Megatron DDP               ``ddp_kwargs()`` -> ``DistributedDataParallelConfig(**...)``
Megatron OptimizerConfig   ``optimizer_kwargs()``; ``optimizer_config(lr=..., ...)``
Megatron optimizer         ``build_optimizer(model_chunks, lr=..., ...)``
vLLM engine                ``vllm_kwargs()`` -> ``LLM(model=..., **...)``
=========================  ====================================================================

Anti-goals: no automatic mixed precision (autocast) — the FP16 claim is about running the whole
model in FP16 on both sides, with a few FP32 islands that both sides share; no FP8/FP4 trainer.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Union

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE, ROUTER_DTYPE, Precision
from megatron_rlfp16.precision.islands import apply_fp32_lm_head

__all__ = [
    "DEFAULT_BACKOFF_FACTOR",
    "DEFAULT_GROWTH_FACTOR",
    "DEFAULT_HYSTERESIS",
    "DEFAULT_INITIAL_LOSS_SCALE",
    "DEFAULT_LOSS_SCALE_WINDOW",
    "DEFAULT_MIN_LOSS_SCALE",
    "Precision",
    "PrecisionConfig",
    "apply_fp32_lm_head",
]

DEFAULT_INITIAL_LOSS_SCALE = 2.0**15
"""32768: verl's Megatron FP16 default. Megatron's own OptimizerConfig default is 2**32: on a model
whose gradients fit at 2**15 that costs 18 skipped steps while the scale halves down."""
DEFAULT_MIN_LOSS_SCALE = 1.0
"""Megatron's default floor for the dynamic scale."""
DEFAULT_LOSS_SCALE_WINDOW = 1000
"""Megatron's default: overflow-free steps before the scale grows."""
DEFAULT_HYSTERESIS = 2
"""Megatron's default: overflows (since the last growth) tolerated before the scale backs off."""
DEFAULT_GROWTH_FACTOR = 2.0
"""What ``get_megatron_optimizer`` hard-codes for ``DynamicGradScaler``'s growth_factor."""
DEFAULT_BACKOFF_FACTOR = 0.5
"""What ``get_megatron_optimizer`` hard-codes for ``DynamicGradScaler``'s backoff_factor."""


# Dynamic-scaler knobs: meaningless with a static loss_scale, and with any trainer but fp16.
_DYNAMIC_FIELDS = (
    "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis", "growth_factor",
    "backoff_factor",
)
# OptimizerConfig / TransformerConfig fields this object owns: set them here, not in `extra`.
_OWNED_OPTIMIZER_FIELDS = (
    "fp16", "bf16", "params_dtype", "loss_scale", "initial_loss_scale", "min_loss_scale",
    "loss_scale_window", "hysteresis", "clip_grad",
)
_OWNED_TRANSFORMER_FIELDS = (
    "fp16", "bf16", "params_dtype", "pipeline_dtype", "attention_softmax_in_fp32", "moe_router_dtype",
)


def _bad(field: str, value, valid: str) -> ValueError:
    return ValueError(f"PrecisionConfig.{field}={value!r} is invalid; valid: {valid}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(kw_only=True)
class PrecisionConfig:
    """Precision of the trainer and the rollout engine, FP16 loss scaling and FP32 islands."""

    trainer: Union[Precision, str] = Precision.FP16
    """Precision Megatron trains in (weights, activations, gradients): "fp16" (the paper's choice),
    "bf16" or "fp32"; aliases such as "float16" or "half" are accepted and normalized."""

    rollout: Optional[Union[Precision, str]] = None
    """Precision of the vLLM rollout engine; None means the trainer's. A different value is an
    ablation and needs ``allow_mismatched_precision=True``."""

    allow_mismatched_precision: bool = False
    """Allow ``rollout`` to differ from ``trainer`` (the paper's ablations, e.g. BF16 training with
    FP32 rollout). Off by default: a silent mismatch is exactly the bias this project removes."""

    loss_scale: Optional[float] = None
    """Static loss scale (a positive number, ideally a power of two) for an fp16 trainer; None gives
    Megatron's dynamic scaler, configured by the fields below."""

    initial_loss_scale: Optional[float] = None
    """Dynamic loss scale at the first step; None means 2**15 = 32768 (verl's Megatron FP16
    setting). fp16 only."""

    min_loss_scale: Optional[float] = None
    """Floor of the dynamic scale; None means 1.0. An overflow that would push the scale below it
    stops training with ``LossScaleFloorError`` (see ``precision.step``). fp16 only."""

    loss_scale_window: Optional[int] = None
    """Growth interval: after this many overflow-free steps the scale is multiplied by
    ``growth_factor``; None means 1000. fp16 only."""

    hysteresis: Optional[int] = None
    """Overflows tolerated before the scale backs off; None means 2. Megatron's counter is reset
    only when the scale grows, so after that many overflows every further overflow backs off until
    the next growth. fp16 only."""

    growth_factor: Optional[float] = None
    """Multiplier (> 1) applied when the scale grows; None means 2.0. fp16 only."""

    backoff_factor: Optional[float] = None
    """Multiplier in (0, 1) applied when the scale backs off; None means 0.5. fp16 only."""

    fp32_logits: bool = True
    """LM head in FP32 on both sides: Megatron's output layer multiplies FP32 copies of its input
    and weight (``prepare_model``) and vLLM runs its lm_head in FP32 (``hf_overrides`` head_dtype).
    Log-softmax is FP32 on both sides regardless. Costs FP32 logits (2x an FP16 logits tensor)."""

    fp32_router: bool = True
    """MoE router logits, softmax and top-k in FP32 (Megatron ``moe_router_dtype="fp32"``): routing
    decisions flip on near-ties, and a flipped expert is a large log-prob mismatch."""

    fp32_attention_softmax: bool = True
    """Attention masking and softmax in FP32 (Megatron ``attention_softmax_in_fp32``): FP16 scores
    overflow at 65504 and the softmax's exp underflows."""

    fp32_grad_reduce: bool = True
    """Accumulate and reduce gradients in FP32 buffers (Megatron DDP ``grad_reduce_in_fp32``): summing
    scaled FP16 gradients over micro-batches and data-parallel ranks would round and overflow."""

    grad_clip: Optional[float] = 1.0
    """Clip the global gradient L2 norm to this value, after unscaling (Megatron ``clip_grad``);
    None disables clipping."""

    def __post_init__(self) -> None:
        # Normalize spellings ("half", torch.float16, ...) so that ``config.trainer.torch_dtype``
        # works at once; a value that is no precision is left for validate() to report.
        for name in ("trainer", "rollout"):
            value = getattr(self, name)
            if value is not None:
                try:
                    setattr(self, name, Precision.parse(value))
                except ValueError:
                    pass

    # -- validation ---------------------------------------------------------------------------

    def validate(self) -> "PrecisionConfig":
        """Normalizes precision names to ``Precision`` and checks every field; returns self.

        Call it once, after the last override (the run plan does). Construction does not validate,
        so fields may be set in any order; the accessors below validate lazily, once per distinct
        set of field values, so a config changed after ``validate()`` is checked again before use.
        """
        self.trainer = Precision.parse(self.trainer, field="PrecisionConfig.trainer")
        if self.rollout is not None:
            self.rollout = Precision.parse(self.rollout, field="PrecisionConfig.rollout")
        for name in ("allow_mismatched_precision", "fp32_logits", "fp32_router",
                     "fp32_attention_softmax", "fp32_grad_reduce"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True or False")
        if self.rollout_precision != self.trainer and not self.allow_mismatched_precision:
            raise ValueError(
                f"PrecisionConfig.rollout={self.rollout.value!r} differs from "
                f"trainer={self.trainer.value!r}: the rollout engine would sample from a different "
                "policy than the one trained, which is the mismatch this project removes. Use the "
                "same precision (rollout=None follows the trainer), or, to run this on purpose as an "
                "ablation (e.g. the paper's BF16 training with FP32 rollout), set "
                "allow_mismatched_precision=True."
            )
        self._validate_loss_scaling()
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and self.grad_clip > 0):
            raise _bad("grad_clip", self.grad_clip, "None (no clipping) or a finite number > 0")
        object.__setattr__(self, "_validated_state", self._state())
        return self

    def _state(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def _checked(self) -> "PrecisionConfig":
        """``self``, validated if its fields changed since the last ``validate()`` (or it never ran)."""
        if getattr(self, "_validated_state", None) != self._state():
            self.validate()
        return self

    def _validate_loss_scaling(self) -> None:
        given = [f for f in ("loss_scale",) + _DYNAMIC_FIELDS if getattr(self, f) is not None]
        if self.trainer != Precision.FP16 and given:
            settings = ", ".join(f"{f}={getattr(self, f)!r}" for f in given)
            raise ValueError(
                f"PrecisionConfig: {settings} set with trainer={self.trainer.value!r}; loss scaling "
                f"only applies to an fp16 trainer (bf16 and fp32 have FP32's exponent range and need "
                f"none). Remove {'it' if len(given) == 1 else 'them'} or set trainer='fp16'."
            )
        if self.loss_scale is not None:
            if not (_is_number(self.loss_scale) and self.loss_scale > 0):
                raise _bad("loss_scale", self.loss_scale,
                           "None (dynamic scaling) or a finite number > 0, e.g. 1024.0")
            dynamic = [f for f in _DYNAMIC_FIELDS if getattr(self, f) is not None]
            if dynamic:
                raise ValueError(
                    f"PrecisionConfig: {', '.join(f'{f}={getattr(self, f)!r}' for f in dynamic)} "
                    f"belong to the dynamic scaler, but loss_scale={self.loss_scale!r} selects a "
                    "static one that would ignore them. Set loss_scale=None for dynamic scaling, or "
                    "drop those fields."
                )
        for name in ("initial_loss_scale", "min_loss_scale"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value > 0):
                raise _bad(name, value, "None (default) or a finite number > 0")
        for name in ("loss_scale_window", "hysteresis"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 1):
                raise _bad(name, value, "None (default) or an integer >= 1")
        if self.growth_factor is not None and not (_is_number(self.growth_factor) and self.growth_factor > 1):
            raise _bad("growth_factor", self.growth_factor, "None (2.0) or a finite number > 1")
        if self.backoff_factor is not None and not (
            _is_number(self.backoff_factor) and 0 < self.backoff_factor < 1
        ):
            raise _bad("backoff_factor", self.backoff_factor, "None (0.5) or a number in (0, 1)")
        if self.dynamic_loss_scaling:
            initial, floor = self.resolved("initial_loss_scale"), self.resolved("min_loss_scale")
            if floor > initial:
                default = lambda f: " (the default)" if getattr(self, f) is None else ""
                raise ValueError(
                    f"PrecisionConfig.min_loss_scale={floor!r}{default('min_loss_scale')} is above "
                    f"initial_loss_scale={initial!r}{default('initial_loss_scale')}; valid: "
                    "min_loss_scale <= initial_loss_scale"
                )

    # -- derived settings ---------------------------------------------------------------------

    @property
    def rollout_precision(self) -> Precision:
        """The rollout engine's precision: ``rollout``, or the trainer's when that is None."""
        trainer = Precision.parse(self.trainer, field="PrecisionConfig.trainer")
        return trainer if self.rollout is None else Precision.parse(self.rollout, field="PrecisionConfig.rollout")

    @property
    def dynamic_loss_scaling(self) -> bool:
        """True when Megatron will build a ``DynamicGradScaler`` (fp16 trainer, no static scale)."""
        return Precision.parse(self.trainer, field="PrecisionConfig.trainer") == Precision.FP16 \
            and self.loss_scale is None

    def resolved(self, field: str):
        """A dynamic-scaler field with its default filled in (e.g. 32768.0 for initial_loss_scale)."""
        defaults = dict(
            initial_loss_scale=DEFAULT_INITIAL_LOSS_SCALE, min_loss_scale=DEFAULT_MIN_LOSS_SCALE,
            loss_scale_window=DEFAULT_LOSS_SCALE_WINDOW, hysteresis=DEFAULT_HYSTERESIS,
            growth_factor=DEFAULT_GROWTH_FACTOR, backoff_factor=DEFAULT_BACKOFF_FACTOR,
        )
        if field not in defaults:
            raise ValueError(f"resolved({field!r}): valid fields are {sorted(defaults)}")
        value = getattr(self, field)
        return defaults[field] if value is None else value

    # -- Megatron model ----------------------------------------------------------------------

    def transformer_overrides(self, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """``TransformerConfig`` fields for ``build_model(config_overrides=...)``.

        ``extra`` (other TransformerConfig fields the caller sets) is checked against the precision
        and merged in; setting a precision-owned field there, or an option that cannot work with
        this precision, is an error naming it.
        """
        self._checked()
        dtype = self.trainer.torch_dtype
        overrides: Dict[str, Any] = dict(
            fp16=self.trainer == Precision.FP16,
            bf16=self.trainer == Precision.BF16,
            params_dtype=dtype,
            pipeline_dtype=dtype,  # activations sent between pipeline stages
            attention_softmax_in_fp32=self.fp32_attention_softmax,
            moe_router_dtype=ROUTER_DTYPE if self.fp32_router else None,
        )
        extra = dict(extra or {})
        self._check_transformer_extra(extra)
        overrides.update(extra)
        return overrides

    def _check_transformer_extra(self, extra: Dict[str, Any]) -> None:
        from megatron.core.transformer import TransformerConfig

        fields = {f.name for f in dataclasses.fields(TransformerConfig)}
        for key in extra:
            if key not in fields:
                raise ValueError(f"transformer_overrides: {key!r} is not a TransformerConfig field")
            if key in _OWNED_TRANSFORMER_FIELDS:
                raise ValueError(
                    f"transformer_overrides: {key}={extra[key]!r} is set by PrecisionConfig "
                    f"(trainer={self.trainer.value!r}, fp32_* islands); change PrecisionConfig instead"
                )
        for key in ("fp8", "fp4"):
            if extra.get(key) is not None:
                raise ValueError(
                    f"transformer_overrides: {key}={extra[key]!r} would run the trainer's GEMMs in "
                    f"{key.upper()} while the rollout engine runs {self.rollout_precision.vllm_dtype}; "
                    f"valid: {key}=None (PrecisionConfig supports fp16, bf16 and fp32 only)"
                )
        if extra.get("apply_query_key_layer_scaling") and not self.fp32_attention_softmax:
            raise ValueError(
                "transformer_overrides: apply_query_key_layer_scaling=True makes Megatron force "
                "attention_softmax_in_fp32=True, contradicting PrecisionConfig."
                "fp32_attention_softmax=False; set one of them the other way"
            )
        if self.trainer == Precision.FP16 and extra.get("moe_grouped_gemm"):
            from megatron_rlfp16.models.builder import te_available

            if extra.get("moe_use_legacy_grouped_gemm") or not te_available():
                raise ValueError(
                    "transformer_overrides: moe_grouped_gemm=True with trainer='fp16' selects "
                    "Megatron's legacy GroupedMLP (no TransformerEngine, or "
                    "moe_use_legacy_grouped_gemm=True), which asserts 'Currently GroupedMLP for MoE "
                    "only supports bf16.' at the first forward; valid: moe_grouped_gemm=False, or "
                    "TransformerEngine's TEGroupedMLP"
                )

    def prepare_model(self, model) -> List[str]:
        """Applies the FP32 islands that live on modules rather than in ``TransformerConfig``:
        with ``fp32_logits``, the LM head (see :func:`apply_fp32_lm_head`). Call it after
        ``build_model`` and before wrapping in DDP. Returns the names of the modules changed."""
        self._checked()
        return apply_fp32_lm_head(model) if self.fp32_logits else []

    def ddp_kwargs(self) -> Dict[str, Any]:
        """``DistributedDataParallelConfig`` fields: FP32 gradient buffers, and Megatron-LM's rule
        for the NaN check: off under dynamic loss scaling (an overflow is the scaler's signal and
        the step is skipped), on otherwise (an inf/NaN gradient is a bug; raise before any
        weight changes)."""
        self._checked()
        return dict(
            grad_reduce_in_fp32=self.fp32_grad_reduce,
            check_for_nan_in_grad=not self.dynamic_loss_scaling,
        )

    # -- Megatron optimizer ------------------------------------------------------------------

    def optimizer_kwargs(self) -> Dict[str, Any]:
        """The precision fields of Megatron's ``OptimizerConfig``."""
        self._checked()
        kwargs: Dict[str, Any] = dict(
            fp16=self.trainer == Precision.FP16,
            bf16=self.trainer == Precision.BF16,
            params_dtype=self.trainer.torch_dtype,
            clip_grad=0.0 if self.grad_clip is None else float(self.grad_clip),
        )
        if self.trainer == Precision.FP16:
            kwargs.update(
                loss_scale=None if self.loss_scale is None else float(self.loss_scale),
                initial_loss_scale=float(self.resolved("initial_loss_scale")),
                min_loss_scale=float(self.resolved("min_loss_scale")),
                loss_scale_window=self.resolved("loss_scale_window"),
                hysteresis=self.resolved("hysteresis"),
            )
        return kwargs

    def optimizer_config(self, **extra):
        """Megatron ``OptimizerConfig`` from ``optimizer_kwargs()`` plus ``extra`` (lr,
        weight_decay, use_distributed_optimizer, adam_beta2, ...). Precision fields in ``extra``
        and optimizer options an fp16 trainer cannot use are errors naming them.

        Megatron hard-codes the growth and backoff factors; a non-default ``growth_factor`` /
        ``backoff_factor`` is applied by :meth:`build_optimizer`, which replaces the scaler.
        """
        from megatron.core.optimizer import OptimizerConfig

        kwargs = self.optimizer_kwargs()
        fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
        for key, value in extra.items():
            if key not in fields:
                raise ValueError(f"optimizer_config: {key!r} is not an OptimizerConfig field")
            if key in _OWNED_OPTIMIZER_FIELDS:
                raise ValueError(
                    f"optimizer_config: {key}={value!r} is set by PrecisionConfig "
                    f"({key} -> {kwargs.get(key)!r}); change PrecisionConfig instead"
                )
        self._check_optimizer_extra(extra)
        return OptimizerConfig(**kwargs, **extra)

    def _check_optimizer_extra(self, extra: Dict[str, Any]) -> None:
        if extra.get("fp8_recipe") is not None:
            raise ValueError(
                f"optimizer_config: fp8_recipe={extra['fp8_recipe']!r} is for FP8 training; valid: "
                "None (PrecisionConfig supports fp16, bf16 and fp32 only)"
            )
        if self.trainer != Precision.FP16:
            return
        if extra.get("optimizer") == "muon":
            raise ValueError(
                "optimizer_config: optimizer='muon' with trainer='fp16': Megatron's Muon raises "
                "'muon with fp16 is not supported.'; valid: 'adam' or 'sgd'"
            )
        if not extra.get("use_precision_aware_optimizer"):
            return
        for key, why in (
            ("main_params_dtype", "FP16 master weights lose every update smaller than half an "
                                  "FP16 ulp of the weight (an RL step at lr 1e-6 is almost all of them)"),
            ("main_grads_dtype", "unscaled 16-bit main gradients give back the range loss scaling "
                                 "protected, and Megatron's grad clipping asserts FP32/BF16 "
                                 "decoupled grads"),
        ):
            value = extra.get(key, ACCUM_DTYPE)
            if value != ACCUM_DTYPE:
                raise ValueError(
                    f"optimizer_config: use_precision_aware_optimizer=True with {key}={value} and "
                    f"trainer='fp16': {why}; valid: {key}={ACCUM_DTYPE}"
                )

    def build_optimizer(self, model_chunks, **extra):
        """``get_megatron_optimizer(self.optimizer_config(**extra), model_chunks)`` with ONE grad
        scaler for the whole step (see :func:`megatron_rlfp16.precision.scaler.install_grad_scaler`):
        Megatron builds one per sub-optimizer (dense and expert parameters under EP), which drift
        apart on an overflow in one of them; the configured growth/backoff factors are applied too."""
        from megatron.core.optimizer import get_megatron_optimizer

        from megatron_rlfp16.precision.scaler import install_grad_scaler

        config = self.optimizer_config(**extra)
        optimizer = get_megatron_optimizer(config, list(model_chunks))
        install_grad_scaler(optimizer, config, growth_factor=self.resolved("growth_factor"),
                            backoff_factor=self.resolved("backoff_factor"))
        return optimizer

    # -- vLLM --------------------------------------------------------------------------------

    def vllm_kwargs(self) -> Dict[str, Any]:
        """Engine arguments for ``vllm.LLM(model=..., **kwargs)`` (or ``EngineArgs``).

        ``dtype`` is the rollout precision; ``kv_cache_dtype="auto"`` keeps the KV cache in that
        precision (an FP8 cache would reintroduce a mismatch); ``hf_overrides.head_dtype`` runs the
        lm_head in FP32 with ``fp32_logits`` and in the model dtype otherwise, matching the
        trainer's ``prepare_model``. Merge your own ``hf_overrides`` into the returned dict.
        """
        self._checked()
        return dict(
            dtype=self.rollout_precision.vllm_dtype,
            kv_cache_dtype="auto",
            hf_overrides={"head_dtype": "float32" if self.fp32_logits else "model"},
        )
