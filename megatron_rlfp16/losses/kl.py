"""Per-token estimators of KL(πθ ‖ π_ref) from samples of πθ, with Δ_t = log πθ_t − log π_ref_t.

From John Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html. With
r = π_ref/πθ = exp(−Δ): k1 = −log r is unbiased but high-variance and can be negative; k2 =
(log r)²/2 is biased but low-variance; k3 = (r − 1) − log r is unbiased, low-variance and never
negative (GRPO's choice, https://arxiv.org/abs/2402.03300).
"""
from __future__ import annotations

import torch

from megatron_rlfp16.losses.registry import register_kl_estimator


@register_kl_estimator("k1")
def k1(delta: torch.Tensor) -> torch.Tensor:
    """k1 = Δ. ``[B, T]`` in and out."""
    return delta


@register_kl_estimator("k2")
def k2(delta: torch.Tensor) -> torch.Tensor:
    """k2 = Δ²/2. ``[B, T]`` in and out."""
    return 0.5 * delta.square()


@register_kl_estimator("k3")
def k3(delta: torch.Tensor) -> torch.Tensor:
    """k3 = exp(−Δ) − 1 + Δ. ``[B, T]`` in and out."""
    return torch.expm1(-delta) + delta
