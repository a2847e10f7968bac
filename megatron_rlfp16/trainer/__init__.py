"""The RL trainer: config, prompt sources, the loop, the supervised warm start, metrics."""
from megatron_rlfp16.trainer.config import RunConfig, TrainerConfig
from megatron_rlfp16.trainer.loop import Trainer
from megatron_rlfp16.trainer.sources import JsonlSource, PromptSource, TaskSource
from megatron_rlfp16.trainer.warm_start import warm_start, warm_start_base

__all__ = ["JsonlSource", "PromptSource", "RunConfig", "TaskSource", "Trainer", "TrainerConfig", "warm_start", "warm_start_base"]
