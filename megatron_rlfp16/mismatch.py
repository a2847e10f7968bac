"""How far the trainer's policy π is from the rollout engine's policy μ, measured on μ's samples.

The rollout engine (vLLM) and the trainer (Megatron) compute the same policy with different
kernels, so for the same tokens they return slightly different log-probabilities. Qi et al. 2025,
"Defeating the Training-Inference Mismatch via FP16" (https://arxiv.org/abs/2510.26788), show that
BF16's 8-bit mantissa makes this gap large enough to bias the policy gradient and destabilise RL,
and that FP16 shrinks it. This module is how the project checks that claim on its own runs: feed
it the trainer's and the rollout's log-probs of the sampled tokens and it returns scalars to log.

Two scales of mismatch matter, and the paper plots both:

- token level (its scatter of π against μ per token): ``prob_diff_mean`` / ``prob_diff_max`` are
  the gap in probability space, which is what you see on that scatter; ``logprob_diff_abs_mean``
  is the same gap in log space, which is what enters the loss; ``ratio_max`` / ``ratio_min`` are
  the extreme per-token importance ratios π/μ, the quantities token-level truncation (TIS/MIS)
  clips, so they tell you how often a correction would fire.
- sequence level (its histogram of log π(y|x) − log μ(y|x)): per-token errors add up along a
  response, so a gap that looks harmless per token becomes a large sequence importance ratio on
  long reasoning traces. ``seq_log_ratio_abs_mean`` / ``seq_log_ratio_abs_max`` measure that sum.

``chi2_token`` / ``chi2_seq`` estimate the χ² divergence of π from μ, E_μ[ρ²] − 1, per token and
per sequence: it is the variance of the importance weights a rollout correction multiplies the
gradient with, so it says what an uncapped correction would cost. ``log_ppl_abs_diff`` compares the
response's log-perplexity under the two engines (verl's ``log_ppl_abs_diff``).

``kl_k1`` and ``kl_k3`` estimate KL(μ‖π) from μ's samples (Schulman's k1 and k3 estimators,
http://joschu.net/blog/kl-approx.html): k1 is unbiased but noisy and can be negative on a batch,
k3 is unbiased and never negative. ``pearson_prob`` is the correlation on that scatter: 1 means
the points sit on the diagonal up to an affine map; it misses a constant offset, so read it next
to ``prob_diff_mean``.

Everything is computed in float64 whatever the input dtype: the gaps being measured (~1e-3 for
BF16, ~1e-4 for FP16) would be distorted by measuring them in the precision that produced them.
Values are 0-dim tensors on the inputs' device; nothing here calls ``.item()``. Input validation
costs one host sync (to reject an empty mask), the same as any loss that checks its denominator.
"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["mismatch_metrics", "METRIC_NAMES"]

METRIC_NAMES = (
    "prob_diff_mean",
    "prob_diff_max",
    "logprob_diff_abs_mean",
    "kl_k1",
    "kl_k3",
    "ratio_max",
    "ratio_min",
    "seq_log_ratio_abs_mean",
    "seq_log_ratio_abs_max",
    "pearson_prob",
    "chi2_token",
    "chi2_seq",
    "log_ppl_abs_diff",
    "num_tokens",
    "num_sequences",
)
"""Keys of the dict ``mismatch_metrics`` returns, in a stable order for loggers."""


def mismatch_metrics(
    train_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """Token- and sequence-level mismatch between π (trainer) and μ (rollout) on μ's samples.

    Args:
        train_logprobs: ``[B, T]`` log π(y_t | x, y_<t), any floating dtype.
        rollout_logprobs: ``[B, T]`` log μ(y_t | x, y_<t) for the same tokens.
        mask: ``[B, T]`` bool or 0/1 of any dtype; 1 marks a response token. Positions outside the
            mask may hold anything (padding, -inf, nan): they never reach a result.

    With d_t = log π_t − log μ_t, m the mask, N = Σ m and S the rows with at least one token:

    ============================  ====================================================
    ``prob_diff_mean``            Σ m·|exp(log π) − exp(log μ)| / N
    ``prob_diff_max``             max over masked tokens of |exp(log π) − exp(log μ)|
    ``logprob_diff_abs_mean``     Σ m·|d| / N
    ``kl_k1``                     Σ m·(−d) / N                    (k1 estimate of KL(μ‖π))
    ``kl_k3``                     Σ m·(exp(d) − 1 − d) / N        (k3 estimate of KL(μ‖π))
    ``ratio_max`` / ``ratio_min``  max / min over masked tokens of exp(d) = π/μ
    ``seq_log_ratio_abs_mean``    mean over rows in S of |Σ_t m·d|
    ``seq_log_ratio_abs_max``     max over rows in S of |Σ_t m·d|
    ``pearson_prob``              Pearson correlation of exp(log π) and exp(log μ) over
                                  masked tokens (nan when either side is constant)
    ``chi2_token``                Σ m·exp(2d) / N − 1             (χ²(π‖μ) per token: E_μ[ρ²] − 1)
    ``chi2_seq``                  mean over rows in S of exp(2·Σ_t m·d) − 1 (per sequence;
                                  the exponent saturates at 700)
    ``log_ppl_abs_diff``          mean over rows in S of |Σ_t m·d| / Σ_t m (the absolute
                                  difference of the two log-perplexities of the response)
    ``num_tokens``                N
    ``num_sequences``             |S|
    ============================  ====================================================

    Returns a dict of float64 0-dim tensors keyed by :data:`METRIC_NAMES`.

    Raises:
        ValueError: the three shapes differ or are not 2-D, an input is not floating point, the
            mask holds values other than 0/1, or the mask selects no token.
    """
    _check_inputs(train_logprobs, rollout_logprobs, mask)
    m = mask != 0
    n_tokens = m.sum()
    if mask.dtype == torch.bool:
        not_binary = torch.zeros((), dtype=torch.bool, device=mask.device)
    else:
        not_binary = ((mask != 0) & (mask != 1)).any()
    # One host sync for both checks.
    empty, bad_values = torch.stack([n_tokens == 0, not_binary]).tolist()
    if bad_values:
        raise ValueError(
            f"mask of dtype {mask.dtype} holds values other than 0 and 1; pass a bool or 0/1 mask"
        )
    if empty:
        raise ValueError(
            f"mask selects no token (shape {tuple(mask.shape)}): the metrics are undefined"
        )

    with torch.no_grad():
        zero = torch.zeros((), dtype=torch.float64, device=m.device)
        # Masked-out positions are zeroed *before* any arithmetic so padding can't make nan.
        lp_train = torch.where(m, train_logprobs.detach().to(torch.float64), zero)
        lp_roll = torch.where(m, rollout_logprobs.detach().to(torch.float64), zero)
        n = n_tokens.to(torch.float64)

        d = lp_train - lp_roll
        p_train, p_roll = lp_train.exp(), lp_roll.exp()
        prob_diff = (p_train - p_roll).abs()
        ratio = d.exp()

        def mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(m, x, zero).sum() / n

        def masked_max(x: torch.Tensor) -> torch.Tensor:
            return torch.where(m, x, torch.full_like(x, -torch.inf)).amax()

        def masked_min(x: torch.Tensor) -> torch.Tensor:
            return torch.where(m, x, torch.full_like(x, torch.inf)).amin()

        rows = m.any(dim=1)
        seq_d = torch.where(m, d, zero).sum(dim=1)
        seq_abs = seq_d.abs()
        n_rows = rows.sum()
        n_rows_f = n_rows.to(torch.float64)
        lengths = m.sum(dim=1).clamp(min=1).to(torch.float64)

        return {
            "prob_diff_mean": mean(prob_diff),
            "prob_diff_max": masked_max(prob_diff),
            "logprob_diff_abs_mean": mean(d.abs()),
            "kl_k1": mean(-d),
            "kl_k3": mean(ratio - 1.0 - d),
            "ratio_max": masked_max(ratio),
            "ratio_min": masked_min(ratio),
            # Rows without tokens have seq_abs == 0, so summing over all rows is the sum over S.
            "seq_log_ratio_abs_mean": seq_abs.sum() / n_rows_f,
            "seq_log_ratio_abs_max": seq_abs.amax(),
            "pearson_prob": _pearson(p_train, p_roll, m, n),
            "chi2_token": mean(ratio.square()) - 1.0,
            "chi2_seq": torch.where(rows, (2.0 * seq_d).clamp(max=700.0).exp(), zero).sum() / n_rows_f - 1.0,
            "log_ppl_abs_diff": (seq_abs / lengths).sum() / n_rows_f,
            "num_tokens": n,
            "num_sequences": n_rows.to(torch.float64),
        }


def _pearson(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xc = torch.where(m, x - torch.where(m, x, zero).sum() / n, zero)
    yc = torch.where(m, y - torch.where(m, y, zero).sum() / n, zero)
    return (xc * yc).sum() / ((xc * xc).sum() * (yc * yc).sum()).sqrt()


def _check_inputs(train: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> None:
    shapes = {
        "train_logprobs": tuple(train.shape),
        "rollout_logprobs": tuple(rollout.shape),
        "mask": tuple(mask.shape),
    }
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise ValueError(f"shape mismatch: {listed}; all three must be the same [B, T]")
    if train.dim() != 2:
        raise ValueError(f"expected [B, T] tensors, got {train.dim()}-D shape {tuple(train.shape)}")
    for name, t in (("train_logprobs", train), ("rollout_logprobs", rollout)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if mask.is_complex():
        raise ValueError(f"mask must be bool or real 0/1, got dtype {mask.dtype}")
