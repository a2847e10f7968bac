"""Tests run functions on real local ranks through the same launcher the tools use."""
from megatron_rlfp16.runtime.launch import RankFailure, run_on_ranks

__all__ = ["RankFailure", "run_on_ranks"]
