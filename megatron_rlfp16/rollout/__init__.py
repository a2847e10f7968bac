"""Rollout: the colocated vLLM engine and the batches it returns."""
from megatron_rlfp16.rollout.batch import RolloutBatch
from megatron_rlfp16.rollout.engine import RolloutConfig, RolloutEngine

__all__ = ["RolloutBatch", "RolloutConfig", "RolloutEngine"]
