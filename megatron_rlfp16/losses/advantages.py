"""Group-relative advantage estimators: one scalar reward per response -> one advantage per response.

Responses come in contiguous groups of ``group_size`` answers to the same prompt; each estimator
uses the group as its own baseline, so no value network is needed.
"""
from __future__ import annotations

import torch

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE

from megatron_rlfp16.losses.registry import ADVANTAGE_ESTIMATORS, register_advantage_estimator


def _need_two(name: str, grouped: torch.Tensor) -> None:
    if grouped.shape[-1] < 2:
        raise ValueError(
            f"advantage estimator {name!r} needs group_size >= 2 (it uses the other answers of the group), "
            f"got group_size={grouped.shape[-1]}"
        )


@register_advantage_estimator("grpo")
def grpo(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """A_i = (r_i − mean_g) / (std_g + eps), std unbiased (divides by G − 1). ``[N/G, G]`` in and out.

    GRPO (DeepSeekMath), https://arxiv.org/abs/2402.03300. A group whose rewards are all equal gets 0.
    """
    _need_two("grpo", grouped)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True, correction=1)
    return (grouped - mean) / (std + eps)


@register_advantage_estimator("drgrpo")
def drgrpo(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """A_i = r_i − mean_g: Dr.GRPO drops the std division, which over-weights easy / hard prompts.

    Dr.GRPO, https://arxiv.org/abs/2503.20783. ``[N/G, G]`` in and out; ``eps`` unused.
    """
    return grouped - grouped.mean(-1, keepdim=True)


@register_advantage_estimator("rloo")
def rloo(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """A_i = r_i − mean_{j≠i} r_j (leave-one-out baseline, unbiased). ``[N/G, G]`` in and out.

    RLOO, Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740; ``eps`` unused.
    """
    _need_two("rloo", grouped)
    size = grouped.shape[-1]
    others_mean = (grouped.sum(-1, keepdim=True) - grouped) / (size - 1)
    return grouped - others_mean


def compute_advantages(
    rewards: torch.Tensor, group_size: int, estimator: str = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Advantages ``[N]`` for rewards ``[N]`` laid out as N/group_size contiguous groups.

    ``estimator`` is "grpo", "drgrpo", "rloo" or a name added with ``register_advantage_estimator``.
    Integer or low-precision rewards are computed in float32. The result carries no gradient.
    """
    fn = ADVANTAGE_ESTIMATORS.get(estimator)
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor [N], got {shape}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has N={rewards.numel()} entries, not a multiple of group_size={group_size}"
        )
    dtype = torch.promote_types(rewards.dtype, ACCUM_DTYPE)
    grouped = rewards.detach().to(dtype).reshape(-1, group_size)
    return fn(grouped, eps).reshape(-1)
