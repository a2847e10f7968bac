"""RL losses in pure torch: policy objectives, rollout corrections, aggregations, KL, advantages.

This package imports no Megatron (and nothing else from this project), so the maths can be read,
tested and reused on its own; the trainer hands it ``[B, T]`` tensors plus the global denominators.

- ``policy.py``       per-token objectives: ppo_clip, gspo, pg, cispo
- ``correction.py``   rollout (training–inference mismatch) corrections: token/seq/geometric TIS, MIS,
                      IcePop, the veto, batch normalization
- ``rejection.py``    k1/k2/k3 divergence rejection per token and per sequence (sum/mean/max)
- ``shaping.py``      DAPO's overlong reward shaping
- ``kl.py``           k1 / k2 / k3 KL estimators
- ``aggregation.py``  per-token losses -> scalar, with explicit global denominators
- ``advantages.py``   group-relative advantages: grpo, drgrpo, rloo
- ``value.py``        PPO with a critic: token rewards, GAE, whitening, the clipped value loss
- ``config.py``       ``PolicyLossConfig``
- ``loss.py``         ``policy_loss``, which composes the above
- ``registry.py``     name tables and the ``register_*`` decorators for extensions

See docs/losses.md for the formulas, papers and recipe configs.
"""
# Importing the modules that hold the built-ins registers them; order matters only in that the
# registries must be filled before a PolicyLossConfig is validated.
from megatron_rlfp16.losses import aggregation, correction, kl, policy, value  # noqa: F401
from megatron_rlfp16.losses.advantages import compute_advantages
from megatron_rlfp16.losses.config import PolicyLossConfig
from megatron_rlfp16.losses.loss import policy_loss
from megatron_rlfp16.losses.policy import PolicyTerms
from megatron_rlfp16.losses.registry import (
    register_advantage_estimator,
    register_aggregation,
    register_correction,
    register_kl_estimator,
    register_policy_loss,
)

__all__ = [
    "PolicyLossConfig",
    "PolicyTerms",
    "compute_advantages",
    "policy_loss",
    "register_advantage_estimator",
    "register_aggregation",
    "register_correction",
    "register_kl_estimator",
    "register_policy_loss",
]
