"""Configuration of an RL run: one keyword-only dataclass per concern, validated once.

The loss is a ``PolicyLossConfig`` and the precision a ``PrecisionConfig``; the CLI flags of
``examples/`` come from ``megatron_rlfp16.megatron.add_rl_args`` (the same ``--rl-*`` flags a
Megatron-LM script gets) plus the run flags in ``trainer.cli``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_rlfp16.losses import PolicyLossConfig
from megatron_rlfp16.precision import PrecisionConfig

ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo")


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """Sizes and schedule of the RL loop."""

    steps: int = 20
    """RL steps (each: rollout, rewards, advantages, log-probs, updates, weight sync)."""
    prompts_per_step: int = 8
    """Distinct prompts sampled per step."""
    group_size: int = 8
    """Responses per prompt (the GRPO group)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer scores the same temperature-scaled distribution."""
    max_new_tokens: int = 16
    """Longest response."""
    updates_per_step: int = 1
    """Optimizer steps per RL step (mini-batches); 1 is fully on-policy."""
    micro_batch_size: int = 16
    """Sequences per forward/backward micro-batch."""
    recompute_old_logprobs: bool = True
    """Compute π_old with the trainer before updating; False is bypass mode (π_old := μ)."""
    advantage_estimator: str = "grpo"
    """"grpo", "drgrpo" or "rloo" (``megatron_rlfp16.losses.compute_advantages``)."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    sync_bucket_mb: int = 256
    """Bucket size of the weight export into the rollout engine (bounds its extra memory)."""

    def validate(self) -> "RunConfig":
        positive = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "updates_per_step",
                    "micro_batch_size", "sync_bucket_mb")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RunConfig.{name}={value!r}: must be an integer >= 1")
        if not self.temperature > 0:
            raise ValueError(f"RunConfig.temperature={self.temperature!r}: must be > 0")
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"RunConfig.advantage_estimator={self.advantage_estimator!r}; "
                             f"valid: {ADVANTAGE_ESTIMATORS}")
        if self.advantage_estimator in ("grpo", "rloo") and self.group_size < 2:
            raise ValueError(f"RunConfig.group_size={self.group_size}: {self.advantage_estimator} "
                             "needs at least 2 responses per prompt")
        if not self.lr > 0:
            raise ValueError(f"RunConfig.lr={self.lr!r}: must be > 0")
        if self.save_every < 0:
            raise ValueError(f"RunConfig.save_every={self.save_every!r}: must be >= 0")
        batch = self.prompts_per_step * self.group_size
        if batch % self.updates_per_step:
            raise ValueError(f"RunConfig.updates_per_step={self.updates_per_step} does not divide the "
                             f"step's {batch} samples (prompts_per_step x group_size)")
        return self


@dataclasses.dataclass(kw_only=True)
class TrainerConfig:
    """Everything an RL run needs besides the prompt source and the reward."""

    hf_dir: str
    """HF checkpoint the run starts from (the rollout engine is created from it too)."""
    out_dir: str = "runs/rl"
    """metrics.jsonl, TensorBoard events, checkpoints (``out_dir/checkpoint``)."""
    tp: int = 1
    pp: int = 1
    ep: int = 1
    rollout_tp: Optional[int] = None
    """Rollout engine TP; None: the trainer's TP."""
    rollout_gpu_memory_utilization: float = 0.4
    """Share of GPU memory for the engine's weights and KV cache (GPU only)."""
    rollout_sleep_level: int = 2
    """vLLM sleep level while training (GPU only): 2 discards the engine's weights, 1 keeps a host copy."""
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    resume: bool = True
    """Continue from ``out_dir/checkpoint`` when it exists."""
    tensorboard: bool = True
    progress: bool = True
    """A progress bar on the console (rank 0)."""

    def validate(self) -> "TrainerConfig":
        self.run.validate()
        self.loss.validate()
        self.precision.validate()
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainerConfig.{name}={getattr(self, name)!r}: must be >= 1")
        if self.rollout_tp is not None and self.rollout_tp < 1:
            raise ValueError(f"TrainerConfig.rollout_tp={self.rollout_tp!r}: must be >= 1")
        if self.rollout_sleep_level not in (1, 2):
            raise ValueError(f"TrainerConfig.rollout_sleep_level={self.rollout_sleep_level!r}; valid: 1, 2")
        if not 0 < self.rollout_gpu_memory_utilization <= 1:
            raise ValueError("TrainerConfig.rollout_gpu_memory_utilization="
                             f"{self.rollout_gpu_memory_utilization!r}: must be in (0, 1]")
        return self
