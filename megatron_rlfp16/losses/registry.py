"""Name -> function tables for every pluggable piece of the RL loss.

A new objective, rollout correction, aggregation, KL estimator or advantage estimator is one function
plus one decorator; ``PolicyLossConfig.validate()`` reads these tables, so a registered name becomes a
valid config value without touching the config class.

Registering a name twice raises instead of replacing the first entry: a silent overwrite lets an
import-order accident change the objective being trained.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from megatron_rlfp16.registry import Registry


class PolicyObjective(NamedTuple):
    """A registered policy loss: the per-token function and its proximal policy.

    ``proximal`` names the policy the rollout correction compares μ against: ``"old"`` (π_old, for
    objectives whose ratio already moves the sample from π_old to πθ) or ``"current"`` (sg(πθ), for
    objectives with no ratio, such as plain policy gradient).
    """

    fn: Callable
    proximal: str


POLICY_LOSSES = Registry("policy loss")
CORRECTIONS = Registry("rollout correction")
AGGREGATIONS = Registry("loss aggregation")
KL_ESTIMATORS = Registry("KL estimator")
ADVANTAGE_ESTIMATORS = Registry("advantage estimator")

_PROXIMAL = ("current", "old")


def register_policy_loss(name: str, *, proximal: str = "old") -> Callable[[Callable], Callable]:
    """Registers ``fn(logprobs, old_logprobs, advantages, mask, config) -> PolicyTerms``.

    All tensors reach ``fn`` as ``[B, T]`` in the compute dtype (at least float32), padding already
    replaced by 0 in the log-probs and ``mask`` a bool tensor; see ``policy.PolicyTerms`` for what it
    returns. ``proximal`` is ``"old"`` or ``"current"`` (see ``PolicyObjective``).
    """
    if proximal not in _PROXIMAL:
        raise ValueError(f"register_policy_loss: proximal={proximal!r}; valid: {_PROXIMAL}")

    def register(fn: Callable) -> Callable:
        POLICY_LOSSES.add(name, PolicyObjective(fn, proximal))
        return fn

    return register


def register_correction(name: str) -> Callable[[Callable], Callable]:
    """Registers ``fn(log_rho, mask, config) -> weight``.

    ``log_rho`` is the detached ``[B, T]`` log-ratio log π_prox − log μ, 0 at padding; ``weight`` must
    broadcast to ``[B, T]`` (``[B, 1]`` for a sequence-level weight) and carry no gradient.
    """
    return CORRECTIONS.decorator(name)


def register_aggregation(name: str) -> Callable[[Callable], Callable]:
    """Registers ``fn(token_loss, mask, num_tokens, num_seqs, config) -> scalar``.

    ``token_loss`` is ``[B, T]`` and already 0 at padding; ``mask`` is the float ``[B, T]`` mask;
    ``num_tokens`` / ``num_seqs`` are the global denominators.
    """
    return AGGREGATIONS.decorator(name)


def register_kl_estimator(name: str) -> Callable[[Callable], Callable]:
    """Registers ``fn(delta) -> kl`` with ``delta = log πθ − log π_ref`` per token, both ``[B, T]``."""
    return KL_ESTIMATORS.decorator(name)


def register_advantage_estimator(name: str) -> Callable[[Callable], Callable]:
    """Registers ``fn(rewards, eps) -> advantages`` on rewards shaped ``[num_groups, group_size]``."""
    return ADVANTAGE_ESTIMATORS.decorator(name)
