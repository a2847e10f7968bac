"""PPO with a critic: token rewards, GAE, advantage whitening and the clipped value loss (pure torch).

Per-token tensors are ``[B, T]`` with a mask m marking the response tokens (contiguous per row);
position t is the state before the t-th target token (``megatron.batch``'s layout), so V_t is the
value the critic gives that state.

- ``token_rewards``: the outcome reward on the last response token, 0 elsewhere; ``kl_penalized``
  subtracts β times the per-token KL to a reference policy from them.
- ``gae``: generalized advantage estimation (Schulman et al. 2015, https://arxiv.org/abs/1506.02438)
  over the response, δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γλ·A_{t+1}, with V and A past the
  last response token 0 (the episode ends there); the value target (return) is R_t = A_t + V_t.
- ``whiten``: (A − mean) / (std + eps) over the masked tokens, as PPO implementations do before
  the policy loss.
- ``value_loss``: PPO's clipped value loss, ½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²)
  per token, divided by the global token count.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE

from megatron_rlfp16.losses.registry import register_advantage_estimator

Count = Union[int, float, torch.Tensor]


@register_advantage_estimator("gae")
def _gae_needs_a_critic(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """GAE is token-level and needs a critic's values: ``RLConfig.advantage_estimator="gae"`` trains
    one (PPO); the function is ``losses.value.gae``."""
    raise ValueError("advantage estimator 'gae' works per token with a critic's values, not on group rewards: "
                     "use megatron_rlfp16.losses.value.gae(rewards, values, mask, gamma, lam), or "
                     "RLConfig.advantage_estimator='gae' (the trainer then trains a critic)")


def _check(name: str, tensor: torch.Tensor, shape) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(shape)} (the mask's)")


def token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: each row's reward (``rewards`` ``[B]``) on its last masked token, 0 elsewhere (a
    row without tokens gets none)."""
    mask = mask != 0
    if rewards.shape != mask.shape[:1]:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected [B] = {tuple(mask.shape[:1])}")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(-1)
    out = torch.zeros(mask.shape, dtype=torch.promote_types(rewards.dtype, ACCUM_DTYPE), device=mask.device)
    rows = torch.nonzero(last >= 0).flatten()
    out[rows, last[rows]] = rewards[rows].to(out.dtype)
    return out


def kl_penalized(rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                 beta: float) -> torch.Tensor:
    """Token rewards with the KL to a reference policy subtracted: r_t − β·(log π_t − log π_ref_t) on
    the masked tokens (the k1 estimate per token, as verl's ``use_kl_in_reward``), 0 elsewhere. All
    ``[B, T]``."""
    mask = mask != 0
    for name, t in (("rewards", rewards), ("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
        _check(name, t, mask.shape)
    dtype = torch.promote_types(rewards.dtype, ACCUM_DTYPE)
    delta = (logprobs.detach().to(dtype) - ref_logprobs.detach().to(dtype)).masked_fill(~mask, 0.0)
    return (rewards.to(dtype) - beta * delta).masked_fill(~mask, 0.0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)``, both ``[B, T]`` and 0 outside the mask, by the reverse-time
    recursion in the module docstring. ``rewards`` and ``values`` ``[B, T]``; nothing carries a
    gradient."""
    mask = mask != 0
    _check("rewards", rewards, mask.shape)
    _check("values", values, mask.shape)
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gae: gamma={gamma!r}, lam={lam!r}; valid: each in [0, 1]")
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), ACCUM_DTYPE)
    r = rewards.detach().to(dtype).masked_fill(~mask, 0.0)
    v = values.detach().to(dtype).masked_fill(~mask, 0.0)
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])
    next_advantage = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        here = delta + gamma * lam * next_advantage
        m = mask[:, t]
        advantages[:, t] = torch.where(m, here, 0.0)
        # A padded position passes nothing back: the response before it ends the episode there.
        next_value = torch.where(m, v[:, t], 0.0)
        next_advantage = torch.where(m, here, 0.0)
    return advantages, (advantages + v).masked_fill(~mask, 0.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, *, sums: Optional[torch.Tensor] = None,
           eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / (std + eps) over the masked entries, 0 outside. ``sums`` = ``[Σ m·x, Σ m·x², Σ m]``
    over the whole batch (e.g. all-reduced over data-parallel ranks); default: this tensor's own."""
    mask = mask != 0
    dtype = torch.promote_types(x.dtype, ACCUM_DTYPE)
    xm = x.detach().to(dtype).masked_fill(~mask, 0.0)
    if sums is None:
        sums = moments(xm, mask)
    count = sums[2].clamp(min=1)
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp(min=0) * count / (count - 1).clamp(min=1)  # unbiased
    return ((xm - mean) / (var.sqrt() + eps)).masked_fill(~mask, 0.0)


def moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[Σ m·x, Σ m·x², Σ m]`` in float64, to sum over micro-batches and ranks for ``whiten``."""
    mask = mask != 0
    xm = x.detach().to(torch.float64).masked_fill(~mask, 0.0)
    return torch.stack([xm.sum(), (xm * xm).sum(), mask.sum().to(torch.float64)])


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: Optional[float] = 0.2, num_tokens: Optional[Count] = None
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO's clipped value loss: Σ m·½·max((V − R)², (V_clip − R)²) / num_tokens with V_clip =
    V_old + clip(V − V_old, −c, c); ``clip=None`` is the plain ½(V − R)². ``values`` carries the
    gradient; ``num_tokens`` is the step's global count (default: this call's mask). Returns the loss
    and detached metrics: ``value_clip_frac`` (tokens where the clipped term is the larger),
    ``value_mean``, ``value_error`` (mean |V − R|)."""
    mask = mask != 0
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        _check(name, t, mask.shape)
    if clip is not None and not clip > 0:
        raise ValueError(f"value_loss: clip={clip!r}; valid: None or a number > 0")
    dtype = torch.promote_types(values.dtype, ACCUM_DTYPE)
    v = values.to(dtype).masked_fill(~mask, 0.0)
    r = returns.detach().to(dtype).masked_fill(~mask, 0.0)
    plain = (v - r).square()
    loss_t, clipped = plain, torch.zeros_like(mask)
    if clip is not None:
        old = old_values.detach().to(dtype).masked_fill(~mask, 0.0)
        v_clip = old + (v - old).clamp(-clip, clip)
        other = (v_clip - r).square()
        loss_t = torch.maximum(plain, other)
        clipped = other > plain
    local = mask.sum().clamp(min=1).to(dtype)
    denominator = local if num_tokens is None else num_tokens
    loss = 0.5 * torch.where(mask, loss_t, 0.0).sum() / denominator
    with torch.no_grad():
        metrics = {
            "value_clip_frac": torch.where(mask, clipped.to(dtype), 0.0).sum() / local,
            "value_mean": v.sum() / local,
            "value_error": torch.where(mask, (v - r).abs(), 0.0).sum() / local,
        }
    return loss, metrics
