"""Megatron's optimizer step, counted: skipped (overflowed) steps, loss-scale metrics, a hard stop.

What Megatron already does (megatron-core 0.16.1, ``MixedPrecisionOptimizer.step`` and
``ChainedOptimizer.step``): the FP16 gradients are copied to FP32 main gradients and unscaled, and
an inf/NaN anywhere — on any rank of the group the optimizer reduces its statistics over (the whole
world for the distributed optimizer) — makes ``step()`` return ``(False, None, None)`` *before* the
inner optimizer runs: no weight, no Adam moment and no step counter changes. The scaler has already
been told (``grad_scaler.update(found_inf)``). Otherwise ``step()`` returns
``(True, grad_norm, num_zeros_in_grad)`` with the norm measured after unscaling, before clipping.

What :class:`OptimizerStep` adds:

- counters (steps, skipped steps, consecutive skips) that go into checkpoints as common state next
  to the optimizer's own sharded state, which carries the grad scaler (``checkpoint_state``);
- one metrics dict per step for the logger (``METRIC_NAMES``);
- a stop when skipping can no longer help: an overflow while the scale sits at its floor and the
  scaler wants to back off again (:class:`LossScaleFloorError`). A dynamic scaler at
  ``min_loss_scale`` whose hysteresis is used up, or a static scale (it never backs off), means the
  FP16 forward/backward overflows *without* help from the loss scale: every further step would be
  skipped, silently burning compute;
- a check that the optimizer was built from the same ``PrecisionConfig`` (scaler kind, floor,
  window, hysteresis, factors), so the counters and the config describe the same run.

With no grad scaler (bf16, fp32) Megatron does not look for inf/NaN before updating; the guard
there is DDP's ``check_for_nan_in_grad``, which ``PrecisionConfig.ddp_kwargs()`` turns on.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from megatron_rlfp16.precision.config import Precision, PrecisionConfig

__all__ = ["METRIC_NAMES", "LossScaleFloorError", "NonFiniteGradientError", "OptimizerStep"]

METRIC_NAMES = ("loss_scale", "overflow", "skipped_steps", "consecutive_skips", "steps", "grad_norm")
"""Keys of the dict ``OptimizerStep.step()`` returns, in a stable order for loggers."""

STATE_VERSION = 1
_SHARDING_TYPES = ("fully_reshardable", "dp_reshardable")


class LossScaleFloorError(RuntimeError):
    """A step overflowed with the loss scale already at its floor; training cannot progress."""

    def __init__(self, message: str, *, step: int, loss_scale: float, skipped_steps: int):
        super().__init__(message)
        self.step = step
        self.loss_scale = loss_scale
        self.skipped_steps = skipped_steps


class NonFiniteGradientError(RuntimeError):
    """Without a grad scaler, an update was applied with a non-finite gradient norm."""


def _zero_adam_state(adam) -> None:
    """The state torch's Adam creates for each parameter at its first step: ``step`` 0 and zero
    moments (``torch.optim.adam._init_group``); the next ``step()`` then does what it would have
    done without it."""
    for group in adam.param_groups:
        on_device = group.get("capturable") or group.get("fused")
        for p in group["params"]:
            if adam.state.get(p):
                continue
            state = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            adam.state[p] = state


def _sub_optimizers(optimizer) -> list:
    from megatron_rlfp16.precision.scaler import sub_optimizers

    return sub_optimizers(optimizer)


class OptimizerStep:
    """Runs ``optimizer.step()`` and keeps the FP16 bookkeeping around it.

    Usage::

        optimizer = precision.build_optimizer([ddp_model], lr=1e-6, use_distributed_optimizer=True)
        stepper = OptimizerStep(optimizer, precision, model=[ddp_model])
        for batch in data:
            ddp_model.zero_grad_buffer(); optimizer.zero_grad()
            forward_backward_func(...)        # scales the loss through config.grad_scale_func
            metrics = stepper.step()          # {"loss_scale": ..., "overflow": 0.0, ...}

    Args:
        optimizer: what ``get_megatron_optimizer`` returned (a ``ChainedOptimizer``, a
            ``DistributedOptimizer``, a ``Float16OptimizerWithFloat16Params`` or an FP32 one).
        precision: the ``PrecisionConfig`` the optimizer was built from; checked against it.
        model: model chunks (or one model) whose ``config.grad_scale_func`` is set to
            ``optimizer.scale_loss``, as Megatron-LM's setup does, so that Megatron's schedules
            multiply the loss by the current scale. None leaves the configs alone (scale the loss
            yourself with :meth:`scale_loss`).
    """

    def __init__(self, optimizer, precision: PrecisionConfig, *, model=None):
        precision.validate()
        self.optimizer = optimizer
        self.precision = precision
        self.steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._check_optimizer()
        if model is not None:
            for chunk in model if isinstance(model, (list, tuple)) else [model]:
                chunk.config.grad_scale_func = optimizer.scale_loss

    # -- the step ----------------------------------------------------------------------------

    @property
    def loss_scale(self) -> float:
        """The scale the next backward is multiplied by (1.0 without a scaler)."""
        return float(self.optimizer.get_loss_scale())

    def scale_loss(self, loss):
        """``loss * loss_scale``, for a backward outside Megatron's schedules."""
        return self.optimizer.scale_loss(loss)

    def step(self) -> Dict[str, float]:
        """One optimizer step (collective, like ``optimizer.step()``); returns the step's metrics.

        ``loss_scale`` is the scale after the scaler's update (the next step's), ``overflow`` is
        1.0 when this step was skipped, ``grad_norm`` is the unscaled norm before clipping (nan on
        a skipped step).

        Raises:
            LossScaleFloorError: this step overflowed and the scale cannot go lower.
            NonFiniteGradientError: without a grad scaler, the applied gradient was inf/NaN.
        """
        scalers = self._scalers()
        scales_before = [None if s is None else float(s.scale) for s in scalers]
        update_successful, grad_norm, _ = self.optimizer.step()
        self.steps += 1
        overflow = not update_successful
        if overflow:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
        norm = float("nan") if grad_norm is None else float(grad_norm)
        metrics = dict(
            loss_scale=self.loss_scale,
            overflow=1.0 if overflow else 0.0,
            skipped_steps=float(self.skipped_steps),
            consecutive_skips=float(self.consecutive_skips),
            steps=float(self.steps),
            grad_norm=norm,
        )
        if overflow and any(_at_floor(s, b) for s, b in zip(scalers, scales_before)):
            raise LossScaleFloorError(
                self._floor_message(), step=self.steps, loss_scale=self.loss_scale,
                skipped_steps=self.skipped_steps,
            )
        if not overflow and not math.isfinite(norm):
            raise NonFiniteGradientError(
                f"step {self.steps}: gradient norm {norm} with no loss scaler "
                f"(trainer={self.precision.trainer.value!r}): the update was applied and the weights "
                "are no longer trustworthy; restore the last checkpoint. Build DDP with "
                "PrecisionConfig.ddp_kwargs() (check_for_nan_in_grad=True) to stop before the update."
            )
        return metrics

    def _floor_message(self) -> str:
        p = self.precision
        if p.dynamic_loss_scaling:
            where = (f"the dynamic loss scale is at its floor min_loss_scale="
                     f"{p.resolved('min_loss_scale'):g} and its hysteresis is used up")
            lower = (f"lower min_loss_scale (now {p.resolved('min_loss_scale'):g}) only if it is "
                     "above 1: below that the scale shrinks gradients instead of protecting them")
        else:
            where = f"the static loss_scale={p.loss_scale:g} cannot back off"
            lower = "use dynamic scaling (loss_scale=None), which backs off on overflow"
        return (
            f"FP16 step {self.steps} overflowed and {where} ({self.skipped_steps} of {self.steps} "
            f"steps skipped, the last {self.consecutive_skips} in a row). Gradients or activations "
            "exceed FP16's range (max 65504) without help from the loss scale, so every further "
            "step would be skipped. Remedies: (1) keep the overflowing computation in FP32 — "
            "PrecisionConfig.fp32_logits / fp32_router / fp32_attention_softmax, and "
            "megatron_rlfp16.precision.promote_to_fp32(model, names) for the modules that "
            "OverflowGuard(model, track_grads=True).report() names; (2) lower the learning rate or "
            f"clip harder (grad_clip, now {p.grad_clip}): growing weights grow activations; "
            f"(3) {lower}; (4) as an ablation, trainer='bf16' (range ~3e38, 8-bit mantissa) at the "
            "cost of the training-inference mismatch FP16 removes."
        )

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The counters, as plain Python values (common, non-sharded checkpoint state). The loss
        scale itself is in the optimizer's state (``grad_scaler``)."""
        return dict(version=STATE_VERSION, steps=self.steps, skipped_steps=self.skipped_steps,
                    consecutive_skips=self.consecutive_skips)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"OptimizerStep state: version {found!r}; supported: {STATE_VERSION}")
        for key in ("steps", "skipped_steps", "consecutive_skips"):
            value = state.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"OptimizerStep state: {key}={value!r}; valid: an integer >= 0")
        if state["skipped_steps"] > state["steps"] or state["consecutive_skips"] > state["skipped_steps"]:
            raise ValueError(f"OptimizerStep state: inconsistent counters {state}")
        self.steps, self.skipped_steps = state["steps"], state["skipped_steps"]
        self.consecutive_skips = state["consecutive_skips"]

    def checkpoint_state(
        self, model, *, is_loading: bool = False, sharding_type: str = "dp_reshardable"
    ) -> Dict[str, Any]:
        """A fragment for ``save_megatron_checkpoint(..., extra_state=...)`` /
        ``load_megatron_checkpoint``: the optimizer's sharded state under "optimizer" (moments and
        FP32 main weights sharded; the grad scaler and Adam step with it) and the counters under
        "precision_step" (common state). Build it with ``is_loading=True`` for a load, then pass
        what the load returned to :meth:`load_checkpoint_state`.

        ``sharding_type`` is the distributed optimizer's format, as Megatron-LM's
        ``distrib_optim_sharding_type``: "dp_reshardable" (default, as in Megatron-LM: no gather,
        only the DP size may change between save and load) or "fully_reshardable" (any layout, at
        the cost of a gather on DP rank 0; in megatron-core 0.16.1 it loads only with
        TransformerEngine's FusedAdam: with torch's Adam, i.e. on CPU, the load fails with
        ``KeyError: 'step'``). The class default of 0.16.1, "fully_sharded_model_space", is
        deprecated and cannot be saved there ("ShardedTensor.flattened_range is not supported").
        """
        from megatron_rlfp16.bridge.context import unwrap

        if sharding_type not in _SHARDING_TYPES:
            raise ValueError(f"checkpoint_state: sharding_type={sharding_type!r}; valid: {_SHARDING_TYPES}")
        self._allocate_optimizer_state(is_loading=is_loading)
        from megatron_rlfp16.checkpoint.megatron_ckpt import model_sharded_state_dict

        model_state = model_sharded_state_dict(unwrap(model))
        metadata = {"distrib_optim_sharding_type": sharding_type}
        return {
            "optimizer": self.optimizer.sharded_state_dict(
                model_state, is_loading=is_loading, metadata=metadata
            ),
            "precision_step": self.state_dict(),
        }

    def _allocate_optimizer_state(self, *, is_loading: bool) -> None:
        # An optimizer that has not stepped yet (the first steps all skipped for overflow, or a
        # critic's warm-up of a policy) holds no Adam state, and a DistributedOptimizer with torch's
        # Adam (no TransformerEngine/Apex, e.g. on CPU) then asserts in state_dict(). torch's Adam
        # gets exactly the state it would create at its first step (step 0, zero moments), so the
        # next step is the same as without it, and a save can be made at any point. Other inner
        # optimizers get Megatron's own allocation for a load (one zero-gradient step; the load
        # overwrites all of it, and the model weights see main weights only after a real step).
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        from megatron_rlfp16.compat.megatron import init_optimizer_state_with_dummy_values

        for sub in _sub_optimizers(self.optimizer):
            inner = getattr(sub, "optimizer", None)
            if inner is None or inner.state:
                continue
            if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
                _zero_adam_state(inner)
            elif is_loading and isinstance(sub, DistributedOptimizer):
                init_optimizer_state_with_dummy_values(sub)

    def load_checkpoint_state(self, loaded: Dict[str, Any]) -> None:
        """Restores the optimizer (moments, step, grad scaler) and the counters from a load."""
        missing = [k for k in ("optimizer", "precision_step") if k not in loaded]
        if missing:
            raise KeyError(f"checkpoint state lacks {missing}; was it saved with checkpoint_state()?")
        self.optimizer.load_state_dict(loaded["optimizer"])
        self._restore_adam_steps()
        self.load_state_dict(loaded["precision_step"])

    def _restore_adam_steps(self) -> None:
        # megatron-core 0.16.1 with torch's Adam (no TransformerEngine/Apex, e.g. on CPU) saves the
        # Adam step in the param groups, then on load (a) sets every parameter's state["step"] to
        # ONE shared tensor, which torch's Adam increments once per parameter in the next step, and
        # (b) with "dp_reshardable" copies the per-parameter step of the optimizer being loaded
        # into it (the dummy step's 1). Either corrupts the bias correction. Rebuild each
        # parameter's step from its group's saved step. (TE's FusedAdam keeps no per-parameter
        # step, so nothing happens there.)
        for sub in _sub_optimizers(self.optimizer):
            inner = getattr(sub, "optimizer", None)
            for group in getattr(inner, "param_groups", []):
                if "step" not in group:
                    continue
                for param in group["params"]:
                    state = inner.state.get(param)
                    if isinstance(state, dict) and isinstance(state.get("step"), torch.Tensor):
                        state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype,
                                                     device=state["step"].device)

    # -- consistency with the PrecisionConfig ------------------------------------------------

    def _scalers(self) -> List[Optional[Any]]:
        from megatron_rlfp16.precision.scaler import unique_scalers

        return unique_scalers(self.optimizer)

    def _check_optimizer(self) -> None:
        from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

        p = self.precision
        hint = "build it with PrecisionConfig.build_optimizer(...)"
        for sub in _sub_optimizers(self.optimizer):
            config = getattr(sub, "config", None)
            if config is not None and (config.fp16, config.bf16) != (
                p.trainer == Precision.FP16, p.trainer == Precision.BF16
            ):
                raise ValueError(
                    f"optimizer has fp16={config.fp16}, bf16={config.bf16} but "
                    f"PrecisionConfig.trainer={p.trainer.value!r}; {hint}"
                )
        for scaler in self._scalers():
            if p.dynamic_loss_scaling:
                if not isinstance(scaler, DynamicGradScaler):
                    raise ValueError(f"optimizer has grad scaler {type(scaler).__name__}, but "
                                     f"PrecisionConfig asks for dynamic loss scaling; {hint}")
                actual = dict(
                    min_loss_scale=float(scaler.min_scale), loss_scale_window=scaler.growth_interval,
                    hysteresis=scaler.hysteresis, growth_factor=float(scaler.growth_factor),
                    backoff_factor=float(scaler.backoff_factor),
                )
                for name, value in actual.items():
                    if value != p.resolved(name):
                        raise ValueError(f"optimizer's grad scaler has {name}={value!r} but "
                                         f"PrecisionConfig.{name} resolves to {p.resolved(name)!r}; {hint}")
            elif p.trainer == Precision.FP16:
                if not isinstance(scaler, ConstantGradScaler) or float(scaler.scale) != p.loss_scale:
                    raise ValueError(f"optimizer's grad scaler is {type(scaler).__name__}, not a "
                                     f"static scale of {p.loss_scale!r}; {hint}")
            elif scaler is not None:
                raise ValueError(f"optimizer has grad scaler {type(scaler).__name__} but "
                                 f"trainer={p.trainer.value!r} uses none; {hint}")


def _at_floor(scaler, scale_before: Optional[float]) -> bool:
    """Whether an overflow just now left ``scaler`` with no room to back off."""
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    if scaler is None:
        return False
    if not isinstance(scaler, DynamicGradScaler):
        return True  # a constant scale never backs off
    state = scaler.state_dict()
    # growth_tracker == 0 and hysteresis_tracker <= 0: this update counted an overflow that
    # exhausted the hysteresis, i.e. the scaler backed off (or would have) on this step.
    wanted_backoff = state["growth_tracker"] == 0 and state["hysteresis_tracker"] <= 0
    return wanted_backoff and scale_before <= float(scaler.min_scale)
