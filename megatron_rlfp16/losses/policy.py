"""Per-token policy objectives ℓ_t: PPO-clip, GSPO, plain policy gradient and CISPO.

Each objective turns ``[B, T]`` log-probs and advantages into a ``[B, T]`` per-token loss; the rollout
correction, KL, entropy and the aggregation into a scalar are applied around it by ``policy_loss``.
Notation: θ current policy, π_old the trainer's behaviour snapshot, A the advantage, m the mask,
sg(·) stop-gradient, r_t = exp(log πθ_t − log π_old_t).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from megatron_rlfp16.losses.registry import register_policy_loss


class PolicyTerms(NamedTuple):
    """What an objective returns, all ``[B, T]``.

    ``loss``: per-token loss ℓ_t (differentiable). ``ratio``: the detached importance ratio the
    objective used, reported as ``ratio_mean`` / ``ratio_max``. ``clipped``: bool, tokens whose
    gradient the clip removed or rescaled, reported as ``clip_frac``. ``lower_clipped``: bool or
    None, tokens a second, lower clip capped (ppo_clip's dual clip), reported as ``lower_clip_frac``.
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    lower_clipped: Optional[torch.Tensor] = None


def _pessimistic(ratio: torch.Tensor, advantages: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)) and where the clipped branch is the larger one."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


@register_policy_loss("ppo_clip", proximal="old")
def ppo_clip(logprobs, old_logprobs, advantages, mask, config) -> PolicyTerms:
    """PPO clipped surrogate, optionally dual-clipped.

    ℓ_t = max(−A·r_t, −A·clip(r_t, 1−ε_low, 1+ε_high)); with dual clip c and A < 0,
    ℓ_t = min(ℓ_t, −c·A). Shapes: all ``[B, T]``. ``clipped`` marks the first clip, ``lower_clipped``
    the dual clip (verl's ``pg_clipfrac`` / ``pg_clipfrac_lower``).

    PPO: https://arxiv.org/abs/1707.06347; GRPO uses it per token: https://arxiv.org/abs/2402.03300;
    dual clip: https://arxiv.org/abs/1912.09729; asymmetric ε_high (clip-higher): DAPO
    https://arxiv.org/abs/2503.14476.
    """
    # Not clamped: an exploding ratio should show up in ratio_max, not be hidden by a silent bound.
    ratio = torch.exp(logprobs - old_logprobs)
    loss, clipped = _pessimistic(ratio, advantages, config)
    dual = None
    if config.dual_clip is not None:
        cap = -config.dual_clip * advantages
        dual = (advantages < 0) & (cap < loss)
        loss = torch.where(dual, cap, loss)
    return PolicyTerms(loss, ratio.detach(), clipped, dual)


@register_policy_loss("gspo", proximal="old")
def gspo(logprobs, old_logprobs, advantages, mask, config) -> PolicyTerms:
    """GSPO (token form): clip the length-normalized *sequence* ratio instead of per-token ratios.

    s_b = exp(Σ_t m·(log πθ − log π_old) / Σ_t m);  s_t = sg(s_b)·exp(log πθ_t − sg(log πθ_t));
    ℓ_t = max(−A_t·s_t, −A_t·clip(s_t, 1−ε_low, 1+ε_high)).
    s_t equals s_b in value and has gradient s_b·∇log πθ_t, so with sequence-level advantages and
    "seq-mean-token-mean" this is GSPO's sequence objective; token-level advantages (``[B, T]``) are
    used per token (GSPO-token). A fully padded row gets s_b = 1. Shapes: all ``[B, T]``.

    GSPO: https://arxiv.org/abs/2507.18071 (the paper uses far smaller clip ranges, ~3e-4/4e-4).
    """
    maskf = mask.to(logprobs.dtype)
    log_seq_ratio = ((logprobs - old_logprobs) * maskf).sum(-1, keepdim=True) / maskf.sum(-1, keepdim=True).clamp(min=1)
    seq_ratio = torch.exp(log_seq_ratio.detach())
    token_ratio = seq_ratio * torch.exp(logprobs - logprobs.detach())
    loss, clipped = _pessimistic(token_ratio, advantages, config)
    return PolicyTerms(loss, seq_ratio.expand_as(logprobs), clipped)


@register_policy_loss("pg", proximal="current")
def pg(logprobs, old_logprobs, advantages, mask, config) -> PolicyTerms:
    """Plain (REINFORCE-style) policy gradient: ℓ_t = −A_t·log πθ_t. Shapes: all ``[B, T]``.

    Its proximal policy is sg(πθ): with ``correction`` it becomes the FP16 paper's PG-Seq-IS
    ("seq_tis", cap inf), PG-Seq-TIS ("seq_tis", cap C) and PG-Seq-MIS ("seq_mis"),
    https://arxiv.org/abs/2510.26788. The reported ratio is exp(log πθ − log π_old), for monitoring;
    nothing is clipped.
    """
    ratio = torch.exp(logprobs - old_logprobs).detach()
    return PolicyTerms(-advantages * logprobs, ratio, torch.zeros_like(mask))


@register_policy_loss("cispo", proximal="old")
def cispo(logprobs, old_logprobs, advantages, mask, config) -> PolicyTerms:
    """CISPO: clip the importance-sampling weight, not the update, so every token keeps a gradient.

    ℓ_t = −sg(clip(r_t, 1−ε_low, 1+ε_high))·A_t·log πθ_t. Shapes: all ``[B, T]``.

    MiniMax-M1: https://arxiv.org/abs/2506.13585 (the paper sets no lower bound; here the smallest
    lower bound is 1 − clip_low with clip_low < 1, e.g. clip_low=0.999).
    """
    ratio = torch.exp(logprobs - old_logprobs).detach()
    lower, upper = 1.0 - config.clip_low, 1.0 + config.clip_high
    weight = ratio.clamp(lower, upper)
    return PolicyTerms(-weight * advantages * logprobs, ratio, (ratio < lower) | (ratio > upper))
