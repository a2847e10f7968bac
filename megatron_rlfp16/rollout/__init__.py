"""Rollout: the colocated vLLM engine and the batches it returns."""
from megatron_rlfp16.rollout.batch import RolloutBatch
from megatron_rlfp16.rollout.engine import RolloutConfig, RolloutEngine
from megatron_rlfp16.rollout.verify import verify_sync

__all__ = ["RolloutBatch", "RolloutConfig", "RolloutEngine", "verify_sync"]
