"""``policy_loss``: objective × rollout correction + KL − entropy, aggregated with global denominators.

The pieces come from the registries (``policy.py``, ``correction.py``, ``kl.py``,
``aggregation.py``); this file only checks the inputs, puts them in one dtype and composes:

    ℓ_t = w·ℓ^obj_t + kl_coef·KL_t − entropy_coef·H_t,   loss = agg(m·ℓ; num_tokens, num_seqs)

Returned metrics are detached tensors (no ``.item()``, so no host sync) averaged over the masked
tokens of this call only; reduce them across micro-batches / ranks yourself if needed.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE

from megatron_rlfp16.losses.config import PolicyLossConfig
from megatron_rlfp16.losses.correction import normalized, rollout_weights, weight_sums
from megatron_rlfp16.losses.registry import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES

Count = Union[int, float, torch.Tensor]


def _check_shape(name: str, tensor: Optional[torch.Tensor], shape: torch.Size) -> None:
    if tensor is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but logprobs has shape {tuple(shape)}; they must match"
        )


def _check_count(name: str, value: Optional[Count]) -> None:
    # A tensor is not inspected: reading its value would be a host sync.
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(value.shape)}")
    elif value is not None and not value > 0:
        raise ValueError(f"{name}={value!r} must be > 0 (it is the global denominator)")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / count


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Every metric passed here is >= 0, so 0 is a neutral fill (and the answer when all is padding).
    return torch.where(mask, x, torch.zeros_like(x)).amax()


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    rollout_logprobs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    ref_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    num_tokens: Optional[Count] = None,
    num_seqs: Optional[Count] = None,
    weight_mean: Optional[Count] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The RL policy loss for one micro-batch, and its metrics.

    Args:
        logprobs: ``[B, T]`` log πθ of the sampled tokens; the only input that gets a gradient.
        old_logprobs: ``[B, T]`` log π_old (trainer snapshot before this update), or None to use
            ``rollout_logprobs`` as π_old ("bypass": the objective's ratio is taken against μ).
        rollout_logprobs: ``[B, T]`` log μ from the rollout engine; needed by any ``correction``
            and by bypass mode, otherwise may be None.
        advantages: ``[B]`` (one per sequence) or ``[B, T]`` (per token).
        mask: ``[B, T]`` bool, or float where non-zero marks a real response token.
        config: a ``PolicyLossConfig``.
        ref_logprobs: ``[B, T]`` log π_ref; needed when ``config.kl_coef != 0``. When given, the
            ``kl`` metric is reported even with kl_coef = 0.
        entropy: ``[B, T]`` per-token entropy H_t; needed when ``config.entropy_coef != 0``.
        num_tokens: global number of response tokens (all micro-batches and DP ranks of the step).
            Default: this call's ``mask.sum()`` (at least 1).
        num_seqs: global number of sequences. Default: this call's rows with at least one masked
            token (at least 1).
        weight_mean: with ``config.correction_normalize``, the batch mean the weights are divided
            by (``correction.weight_sums`` of the whole step). Default: this call's own mean.

    With ``config.rejection_mode="remove"`` the rejected tokens leave ``mask`` here; global
    ``num_tokens`` / ``num_seqs`` must then be counted on the mask after that removal (the trainer's
    ``train_step`` does so).

    Returns:
        ``(loss, metrics)``: the scalar loss in the compute dtype (the wider of float32 and
        ``logprobs.dtype``) and a dict of detached 0-dim tensors: ``clip_frac``, ``ratio_mean``,
        ``ratio_max``, ``correction_weight_mean``, ``correction_weight_max``,
        ``correction_zeroed_frac``, ``correction_removed_frac``, ``lower_clip_frac``, ``kl``,
        ``entropy`` (``kl`` / ``entropy`` are 0 when their inputs are not given; correction metrics
        are 1, 1, 0, 0 without a correction). Sequence-level weights are averaged per token.
        ``clip_frac`` counts the tokens the ratio clip acted on, ``lower_clip_frac`` those the
        dual clip capped (A < 0), as verl reports them; ``correction_removed_frac`` is relative to
        the given mask, the others to the tokens left in the loss.
    """
    objective = POLICY_LOSSES.get(config.loss)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    for name, tensor in (
        ("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs), ("mask", mask),
        ("ref_logprobs", ref_logprobs), ("entropy", entropy),
    ):
        _check_shape(name, tensor, shape)
    if tuple(advantages.shape) not in (tuple(shape[:1]), tuple(shape)):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [B] = {tuple(shape[:1])} or "
            f"[B, T] = {tuple(shape)} (logprobs has shape {tuple(shape)})"
        )
    if rollout_logprobs is None and config.correction is not None:
        raise ValueError(f"rollout_logprobs is None but config.correction={config.correction!r} needs it")
    if rollout_logprobs is None and config.correction_veto is not None:
        raise ValueError(f"rollout_logprobs is None but config.correction_veto={config.correction_veto!r} needs it")
    if rollout_logprobs is None and config.rejection is not None:
        raise ValueError(f"rollout_logprobs is None but config.rejection={config.rejection!r} needs it")
    if old_logprobs is None and config.rejection_mode == "remove" and objective.proximal == "current":
        raise ValueError(
            f"config.rejection_mode='remove' decides on π_old, and loss={config.loss!r} (proximal policy "
            "sg(πθ)) has none in bypass mode (old_logprobs=None); pass old_logprobs or use rejection_mode='zero'"
        )
    if rollout_logprobs is None and old_logprobs is None:
        raise ValueError("old_logprobs and rollout_logprobs are both None; bypass mode (old_logprobs=None) "
                         "uses rollout_logprobs as π_old, so pass at least one")
    if ref_logprobs is None and config.kl_coef != 0:
        raise ValueError(f"ref_logprobs is None but config.kl_coef={config.kl_coef!r} needs it")
    if entropy is None and config.entropy_coef != 0:
        raise ValueError(f"entropy is None but config.entropy_coef={config.entropy_coef!r} needs it")
    _check_count("num_tokens", num_tokens)
    _check_count("num_seqs", num_seqs)
    _check_count("weight_mean", weight_mean)

    dtype = torch.promote_types(logprobs.dtype, ACCUM_DTYPE)
    mask = mask if mask.dtype == torch.bool else mask != 0

    # Padding may hold anything (even inf); zeroing it first keeps NaNs out of both loss and grads.
    def prepare(t: Optional[torch.Tensor], detach: bool = True) -> Optional[torch.Tensor]:
        if t is None:
            return None
        t = t.detach() if detach else t
        return t.to(dtype).masked_fill(~mask, 0.0)

    lp = prepare(logprobs, detach=False)
    mu = prepare(rollout_logprobs)
    old = prepare(old_logprobs) if old_logprobs is not None else mu
    given = mask
    one = torch.ones((), dtype=dtype, device=lp.device)
    weight = one.expand(shape)
    corrected = config.corrected
    if corrected:
        proximal = old if objective.proximal == "old" else lp.detach()
        weight, seq_level = rollout_weights((proximal - mu).masked_fill(~mask, 0.0), mask, config)
        if config.rejection_mode == "remove":  # decided on π_old (= the proximal policy before any update)
            decided = weight if objective.proximal == "old" else rollout_weights(
                (old - mu).masked_fill(~mask, 0.0), mask, config)[0]
            mask = mask & (decided != 0)
        if config.correction_normalize:
            if weight_mean is None:
                sums = weight_sums(weight, mask, seq_level)
                weight_mean = sums[0] / sums[1].clamp(min=1)
            weight = normalized(weight, torch.as_tensor(weight_mean, dtype=dtype, device=lp.device))
    maskf = mask.to(dtype)
    adv = advantages.detach().to(dtype)
    adv = (adv[:, None] if adv.dim() == 1 else adv).expand(shape).masked_fill(~mask, 0.0)

    terms = objective.fn(lp, old, adv, mask, config)
    token_loss = weight * terms.loss if corrected else terms.loss
    zeroed = mask & (weight == 0)

    kl = None
    if ref_logprobs is not None:
        kl = KL_ESTIMATORS.get(config.kl_estimator)(lp - prepare(ref_logprobs))
        if config.kl_coef != 0:
            token_loss = token_loss + config.kl_coef * kl
    ent = prepare(entropy, detach=False)
    if ent is not None and config.entropy_coef != 0:
        token_loss = token_loss - config.entropy_coef * ent

    # Built-ins already give 0 at padding; a registered objective need not, and aggregations rely on it.
    token_loss = torch.where(mask, token_loss, torch.zeros_like(token_loss))
    local_tokens = maskf.sum().clamp(min=1)
    num_tokens = local_tokens if num_tokens is None else num_tokens
    num_seqs = (maskf.sum(-1) > 0).sum().to(dtype).clamp(min=1) if num_seqs is None else num_seqs
    loss = AGGREGATIONS.get(config.agg)(token_loss, maskf, num_tokens, num_seqs, config)

    zero = torch.zeros((), dtype=dtype, device=lp.device)
    lower = terms.lower_clipped
    with torch.no_grad():
        metrics = {
            "clip_frac": _masked_mean(terms.clipped.to(dtype), mask, local_tokens),
            "lower_clip_frac": _masked_mean(lower.to(dtype), mask, local_tokens) if lower is not None else zero,
            "ratio_mean": _masked_mean(terms.ratio, mask, local_tokens),
            "ratio_max": _masked_max(terms.ratio, mask),
            "correction_weight_mean": _masked_mean(weight, mask, local_tokens) if corrected else one,
            "correction_weight_max": _masked_max(weight, mask) if corrected else one,
            "correction_zeroed_frac": _masked_mean(zeroed.to(dtype), mask, local_tokens),
            "correction_removed_frac": (given & ~mask).sum().to(dtype) / given.sum().clamp(min=1),
            "kl": _masked_mean(kl, mask, local_tokens) if kl is not None else zero,
            "entropy": _masked_mean(ent, mask, local_tokens) if ent is not None else zero,
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
