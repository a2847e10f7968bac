"""Configuration of an RL run: one keyword-only dataclass per concern, each field defined once.

=====================  ======================================================  ===================
concern                dataclass (its home)                                    TrainerConfig field
=====================  ======================================================  ===================
parallel layout        ``runtime.ParallelConfig`` (tp, pp, ep, etp)              ``parallel``
rollout engine         ``rollout.RolloutConfig`` (tp, max_model_len, ...)        ``rollout``
RL objective           ``megatron.args.RLConfig`` (loss, estimator, group, T)    ``rl``
precision              ``precision.PrecisionConfig``                             ``precision``
memory layout          ``plan.memory.MemoryConfig`` (distributed optimizer, ...)  ``memory``
LoRA adapters          ``lora.LoraConfig`` (rank, alpha, targets, sync)           ``lora``
PPO's value model      ``megatron.critic.CriticConfig`` (hf_dir, lr, value clip)  ``critic``
loop sizes, schedule   ``RunConfig`` (below)                                     ``run``
=====================  ======================================================  ===================

Nothing is validated at construction: ``TrainerConfig.validate()`` runs once, after the last
override (``plan.resolve_plan`` calls it), and names the field, its value and what is valid. The
CLI flags map 1:1 onto these fields (``--tp`` → ``parallel.tp``, ``--rollout-tp`` → ``rollout.tp``,
``--rl-group-size`` → ``rl.group_size``, ...). Spellings from before this layout (``TrainerConfig(tp=...,
rollout_tp=..., loss=...)``, ``RunConfig(group_size=..., temperature=..., advantage_estimator=...)``)
keep working and warn once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from megatron_rlfp16.deprecation import warn_renamed
from megatron_rlfp16.lora.config import LoraConfig
from megatron_rlfp16.losses import PolicyLossConfig
from megatron_rlfp16.megatron.args import RLConfig
from megatron_rlfp16.megatron.critic import CriticConfig
from megatron_rlfp16.plan.memory import MemoryConfig
from megatron_rlfp16.precision import PrecisionConfig
from megatron_rlfp16.rollout.engine import RolloutConfig
from megatron_rlfp16.runtime import ParallelConfig

# Old spelling -> (sub-config, field): kept working with a warning.
_RUN_MOVED = {"group_size": "rl", "temperature": "rl", "advantage_estimator": "rl"}
_TRAINER_MOVED = {
    "tp": ("parallel", "tp"), "pp": ("parallel", "pp"), "ep": ("parallel", "ep"),
    "rollout_tp": ("rollout", "tp"), "rollout_gpu_memory_utilization": ("rollout", "gpu_memory_utilization"),
    "rollout_sleep_level": ("rollout", "sleep_level"), "loss": ("rl", "loss"),
}


def _int_at_least(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """Sizes and schedule of the RL loop."""

    steps: int = 20
    """RL steps (each: rollout, rewards, advantages, log-probs, updates, weight sync)."""
    prompts_per_step: int = 8
    """Distinct prompts sampled per step."""
    max_new_tokens: int = 16
    """Longest response."""
    updates_per_step: int = 1
    """Optimizer steps per RL step (mini-batches); 1 is fully on-policy."""
    micro_batch_size: int = 16
    """Sequences per forward/backward micro-batch."""
    recompute_old_logprobs: bool = True
    """Compute π_old with the trainer before updating; False is bypass mode (π_old := μ)."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0
    save_every: Optional[int] = None
    """Save a checkpoint every N steps (``--save-every``); 0: only at the end; None: every
    ``max(1, steps // 10)`` steps, so a killed run loses at most a tenth of its work."""
    keep_checkpoints: int = 1
    """Checkpoints kept (``--keep-checkpoints K``): the latest is ``out/checkpoint``, resumed from;
    with K > 1 the K - 1 before it stay as ``out/checkpoint.step-<N>`` (rename one to
    ``checkpoint`` to resume from it)."""
    sync_bucket_mb: int = 256
    """Bucket size of the weight export into the rollout engine (bounds its extra memory)."""
    log_samples: int = 0
    """Every N steps, write a few (prompt, response, reward) rows to ``samples.jsonl`` and TensorBoard
    (``--log-samples N``); 0: never."""
    samples_per_log: int = 4
    """Rows written each time samples are logged."""

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints (0: only at the end), with the None default resolved."""
        return max(1, self.steps // 10) if self.save_every is None else self.save_every

    def validate(self) -> "RunConfig":
        positive = ("steps", "prompts_per_step", "max_new_tokens", "updates_per_step",
                    "micro_batch_size", "sync_bucket_mb", "samples_per_log", "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if not _int_at_least(value, 1):
                raise ValueError(f"RunConfig.{name}={value!r}: must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"RunConfig.lr={self.lr!r}: must be > 0")
        if self.save_every is not None and not _int_at_least(self.save_every, 0):
            raise ValueError(f"RunConfig.save_every={self.save_every!r}: must be None or an integer >= 0")
        for name in ("log_samples",):
            if not _int_at_least(getattr(self, name), 0):
                raise ValueError(f"RunConfig.{name}={getattr(self, name)!r}: must be an integer >= 0")
        return self


def _run_init(original):
    def __init__(self, **kwargs):
        moved = {k: kwargs.pop(k) for k in list(kwargs) if k in _RUN_MOVED}
        original(self, **kwargs)
        for name in moved:
            warn_renamed(f"RunConfig({name}=...)", f"TrainerConfig(rl=RLConfig({name}=...))")
        self._moved_to_rl = moved  # applied by the TrainerConfig that receives this RunConfig

    return __init__


RunConfig.__init__ = _run_init(RunConfig.__init__)


def _moved_run_field(name: str):
    def get(self):
        warn_renamed(f"RunConfig.{name}", f"TrainerConfig.rl.{name}")
        rl = getattr(self, "_rl", None)
        if rl is not None:
            return getattr(rl, name)
        if name in self._moved_to_rl:
            return self._moved_to_rl[name]
        return getattr(RLConfig(), name)

    return property(get)


for _name in _RUN_MOVED:
    setattr(RunConfig, _name, _moved_run_field(_name))


@dataclasses.dataclass(kw_only=True)
class TrainerConfig:
    """Everything an RL run needs besides the prompt source and the reward."""

    hf_dir: str
    """HF checkpoint the run starts from (the rollout engine is created from it too)."""
    out_dir: str = "runs/rl"
    """metrics.jsonl, TensorBoard events, checkpoints (``out_dir/checkpoint``)."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """Megatron's layout; data parallelism takes what the world leaves."""
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    """The vLLM engine's settings (its precision comes from ``precision``)."""
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    """Policy loss, advantage estimator, group size, sampling temperature."""
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    """Distributed optimizer, activation recompute, attention kernel, device memory (the memory plan)."""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    """Low-rank adapters instead of full fine-tuning (``rank`` 0, the default: full fine-tuning)."""
    critic: CriticConfig = dataclasses.field(default_factory=CriticConfig)
    """The value model PPO trains (``rl.advantage_estimator="gae"``); unused otherwise."""
    resume: bool = True
    """Continue from ``out_dir/checkpoint`` when it exists."""
    tensorboard: bool = True
    progress: bool = True
    """A progress bar on the console (rank 0)."""
    allow_changed_settings: bool = False
    """Resume a checkpoint whose precision, model, loss or layout differ from this run's (an
    ablation on purpose); the first resumed step's metrics record what changed. Off: refused."""

    def __post_init__(self) -> None:
        moved = getattr(self.run, "_moved_to_rl", {})
        if moved:
            self.rl = dataclasses.replace(self.rl, **moved)
            self.run._moved_to_rl = {}
        self.run._rl = self.rl

    def validate(self) -> "TrainerConfig":
        """Validates every sub-config once; returns self."""
        self.run._rl = self.rl
        self.run.validate()
        self.rl.validate()
        self.precision.validate()
        self.rollout.validate()
        self.memory.validate()
        self.lora.validate()
        self.critic.validate()
        for name in ("tp", "pp", "ep"):
            value = getattr(self.parallel, name)
            if not _int_at_least(value, 1):
                raise ValueError(f"TrainerConfig.parallel.{name}={value!r}: must be an integer >= 1")
        if self.rl.advantage_estimator in ("grpo", "rloo") and self.rl.group_size < 2:
            raise ValueError(f"RLConfig.group_size={self.rl.group_size}: {self.rl.advantage_estimator} "
                             "needs at least 2 responses per prompt")
        return self


def _trainer_init(original):
    def __init__(self, **kwargs):
        moved: Dict[str, Any] = {k: kwargs.pop(k) for k in list(kwargs) if k in _TRAINER_MOVED}
        original(self, **kwargs)
        for old, value in moved.items():
            part, field = _TRAINER_MOVED[old]
            warn_renamed(f"TrainerConfig({old}=...)", f"TrainerConfig.{part}.{field}")
            if part == "rl" and field == "loss":
                self.rl = dataclasses.replace(self.rl, loss=value)
                self.run._rl = self.rl
            else:
                setattr(getattr(self, part), field, value)

    return __init__


TrainerConfig.__init__ = _trainer_init(TrainerConfig.__init__)


def _moved_trainer_field(old: str):
    part, field = _TRAINER_MOVED[old]

    def get(self):
        warn_renamed(f"TrainerConfig.{old}", f"TrainerConfig.{part}.{field}")
        return getattr(getattr(self, part), field)

    return property(get)


for _name in _TRAINER_MOVED:
    setattr(TrainerConfig, _name, _moved_trainer_field(_name))

__all__ = ["PolicyLossConfig", "RunConfig", "TrainerConfig"]
