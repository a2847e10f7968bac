"""``build_run``: the run's objects from a ``RunPlan``, in the one correct order.

runtime → model (built in the trainer's precision) → weights → FP32 islands → DDP → optimizer
(one grad scaler shared by its sub-optimizers) → optimizer step (sets the schedule's loss-scale
hook) → rollout engine. Each stage is also a function of its own, for tools that need only some
(the mismatch tool builds the model and the engine, no optimizer).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from megatron_rlfp16.plan.resolve import RunPlan


@dataclasses.dataclass
class RunObjects:
    model: Any
    """The model wrapped in Megatron DDP."""
    optimizer: Any
    stepper: Any
    """``precision.OptimizerStep`` around ``optimizer``."""
    engine: Any
    """``rollout.RolloutEngine`` (None when built without one)."""


def init_runtime(plan: RunPlan, *, seed: int = 0):
    from megatron_rlfp16.runtime import init_runtime as _init

    return _init(plan.parallel, seed=seed)


def build_model(plan: RunPlan, *, load_weights: bool = True):
    """This rank's ``GPTModel`` in the trainer's precision, with the HF weights (unless
    ``load_weights=False``) and the FP32 islands applied. Needs the runtime."""
    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.models import build_model as _build

    model, _ = _build(plan.arch, params_dtype=plan.trainer_dtype, config_overrides=dict(plan.transformer_overrides))
    if load_weights:
        load_hf_checkpoint(model, plan.arch, plan.hf_dir)
    plan.precision.prepare_model(model)  # FP32 islands: after the weights, before DDP
    return model


def wrap_model(model, plan: RunPlan):
    """Megatron DDP with the plan's arguments (a model already wrapped is returned as it is)."""
    from megatron_rlfp16.megatron.train import wrap_ddp

    if hasattr(model, "zero_grad_buffer"):
        return model
    return wrap_ddp(model, **plan.ddp)


def build_optimizer(ddp_model, plan: RunPlan):
    """``(optimizer, stepper)``: Megatron's optimizer with one shared scaler, and ``OptimizerStep``."""
    from megatron_rlfp16.precision import OptimizerStep

    optimizer = plan.precision.build_optimizer([ddp_model], **plan.optimizer)
    return optimizer, OptimizerStep(optimizer, plan.precision, model=ddp_model)


def build_engine(plan: RunPlan):
    import torch

    from megatron_rlfp16.rollout import RolloutEngine

    kwargs = dict(plan.engine_kwargs)
    if torch.cuda.is_available():
        kwargs.update(plan.engine_gpu_kwargs)
    return RolloutEngine(plan.hf_dir, plan.rollout, engine_kwargs=kwargs,
                         fp32_router=plan.arch.is_moe and plan.precision.fp32_router)


def build_run(plan: RunPlan, *, seed: int = 0, model=None, engine: bool = True) -> RunObjects:
    """Every object of the run, in order. ``model`` hands over an already built (and possibly
    trained, possibly DDP-wrapped) model instead of loading ``plan.hf_dir``."""
    init_runtime(plan, seed=seed)
    if model is None:
        model = build_model(plan)
    ddp = wrap_model(model, plan)
    if plan.rollout.return_routes or plan.routing_replay != "none":
        from megatron_rlfp16.megatron import routing

        routing.install(ddp)  # replay hooks on the routers (agreement is measured with routes)
    optimizer, stepper = build_optimizer(ddp, plan)
    return RunObjects(model=ddp, optimizer=optimizer, stepper=stepper,
                      engine=build_engine(plan) if engine else None)



__all__ = ["RunObjects", "build_engine", "build_model", "build_optimizer", "build_run", "init_runtime", "wrap_model"]
