"""``build_run``: the run's objects from a ``RunPlan``, in the one correct order.

runtime → model (built in the trainer's precision) → weights → FP32 islands → LoRA adapters (a LoRA
run: the base frozen) → DDP (the trainable parameters only) → optimizer
(one grad scaler shared by its sub-optimizers) → optimizer step (sets the schedule's loss-scale
hook) → PPO's critic (its own model, optimizer and loss scale) → the KL's reference policy (frozen)
→ rollout engine. Each stage is also a function of its own, for tools that need only some
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
    critic: Any = None
    """PPO's value model in Megatron DDP (``megatron.critic``), or None."""
    critic_optimizer: Any = None
    critic_stepper: Any = None
    """``precision.OptimizerStep`` of the critic: its own loss scale."""
    reference: Any = None
    """The frozen reference policy of the KL penalty (a bare ``GPTModel``), or None."""


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


def add_adapters(model, plan: RunPlan, *, seed: int = 0):
    """A LoRA run's adapters on a model not yet wrapped in DDP (``lora.apply_lora``); a model that
    has them already must have the plan's; nothing for a full fine-tuning run."""
    from megatron_rlfp16.lora import apply_lora
    from megatron_rlfp16.lora.layers import lora_config_of

    have = lora_config_of(model)
    if have is not None or not plan.lora.enabled:
        if have is not None and (not plan.lora.enabled or (have.rank, have.targets_for(plan.arch.is_moe)) != (
                plan.lora.rank, plan.lora.target_modules)):
            raise ValueError(f"the model handed to the trainer has LoRA adapters (rank {have.rank}) that do not "
                             f"match TrainerConfig.lora (rank {plan.lora.rank})")
        return model
    if hasattr(model, "zero_grad_buffer"):
        raise ValueError("TrainerConfig.lora: the model handed to the trainer is already wrapped in DDP, so "
                         "adapters cannot be added; hand over the bare model (or add them with apply_lora first)")
    apply_lora(model, plan.arch, plan.lora, seed=seed)
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


def build_critic(plan: RunPlan):
    """``(critic, optimizer, stepper)``: PPO's value model from ``plan.critic.hf_dir`` in the trainer's
    precision (FP32 islands, then the value head), in DDP, with an optimizer and a loss scaler of its
    own. Needs the runtime."""
    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.megatron.critic import make_critic
    from megatron_rlfp16.models import build_model as _build
    from megatron_rlfp16.precision import OptimizerStep

    arch = plan.critic.arch
    model, _ = _build(arch, params_dtype=plan.trainer_dtype, config_overrides=dict(plan.transformer_overrides))
    load_hf_checkpoint(model, arch, plan.critic.hf_dir)
    plan.precision.prepare_model(model)
    make_critic(model)
    ddp = wrap_model(model, plan)
    optimizer = plan.precision.build_optimizer([ddp], **plan.critic.optimizer)
    return ddp, optimizer, OptimizerStep(optimizer, plan.precision, model=ddp)


def build_reference(plan: RunPlan):
    """The KL penalty's reference policy: ``plan.hf_dir`` in the trainer's precision (a LoRA run's
    base without adapters), frozen, for forward-only log-probs. Needs the runtime."""
    model = build_model(plan)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


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
    add_adapters(model, plan, seed=seed)
    ddp = wrap_model(model, plan)
    if plan.rollout.return_routes or plan.routing_replay != "none":
        from megatron_rlfp16.megatron import routing

        routing.install(ddp)  # replay hooks on the routers (agreement is measured with routes)
    optimizer, stepper = build_optimizer(ddp, plan)
    critic = build_critic(plan) if plan.critic else (None, None, None)
    return RunObjects(model=ddp, optimizer=optimizer, stepper=stepper,
                      engine=build_engine(plan) if engine else None,
                      critic=critic[0], critic_optimizer=critic[1], critic_stepper=critic[2],
                      reference=build_reference(plan) if plan.reference else None)



__all__ = ["RunObjects", "add_adapters", "build_critic", "build_engine", "build_reference", "build_model", "build_optimizer", "build_run", "init_runtime", "wrap_model"]
