"""The run plan: a run's setup resolved once, then built in one order.

``resolve_plan(config)`` turns the validated, user-facing configs (``trainer.TrainerConfig``) into a
frozen ``RunPlan``: parallel layout, the precision of every consumer, the sequence multiple, the
micro-batch arithmetic, the DDP / optimizer / scaler arguments, the vLLM engine's arguments, the
export dtype and bucket size, and the memory plan (``plan.memory``: bytes per rank and phase, checked
against the device before anything is allocated). ``build_run(plan)`` builds the run's objects from it in the one
correct order (runtime → model → weights → FP32 islands → LoRA adapters → DDP → optimizer with its one shared
scaler → optimizer step → engine). The trainer, the warm start, the mismatch tool and the examples
all read the plan; no stage re-derives a rule another stage owns.
"""
from megatron_rlfp16.plan.build import RunObjects, add_adapters, build_engine, build_model, build_optimizer, build_run, wrap_model
from megatron_rlfp16.plan.memory import MemoryConfig, MemoryPlan, MemoryPlanError, plan_memory
from megatron_rlfp16.plan.resolve import RunPlan, resolve_plan

__all__ = [
    "MemoryConfig", "MemoryPlan", "MemoryPlanError", "RunObjects", "RunPlan", "add_adapters", "build_engine", "build_model", "build_optimizer", "build_run", "plan_memory",
    "resolve_plan", "wrap_model",
]
