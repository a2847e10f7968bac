"""Divergence-based rejection: drop the tokens or whole sequences the rollout engine and the trainer
disagree on too much, measured by a per-token divergence estimator.

With log ρ_t = log π_prox(y_t) − log μ(y_t) (the rollout correction's log-ratio, ``correction.py``),
three per-token estimators of the divergence between the engine's μ and the trainer's π_prox, from
Schulman's "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html), on μ's samples:

    k1_t = −log ρ_t                (signed; E_μ[k1] = KL(μ‖π_prox))
    k2_t = ½ (log ρ_t)²            (≥ 0)
    k3_t = ρ_t − 1 − log ρ_t       (≥ 0; E_μ[k3] = KL(μ‖π_prox))

A criterion is ``<level>_<estimator>`` (verl's ``rollout_rs`` names):

    token_kN      rejects each token whose k_t leaves the bound
    seq_sum_kN    rejects the sequence whose Σ_t m·k_t leaves it
    seq_mean_kN   rejects the sequence whose Σ_t m·k_t / Σ_t m leaves it
    seq_max_kN    rejects the sequence whose max over its tokens of k_t leaves it

k2 and k3 criteria take an upper bound U (reject above it). k1 is signed, so its criteria take a band
[L, U] on the matching ratio instead: ρ_t (token_k1), Π_t ρ_t (seq_sum_k1), the geometric mean
exp(mean log ρ_t) (seq_mean_k1), and every token's ρ_t (seq_max_k1: a sequence is kept only if its
most extreme token is inside the band). A single number U means the band [1/U, U] (verl's
convention); L = 0 leaves the band open below, U = inf open above.

Several criteria combine with AND: a token survives only if every criterion keeps it.
"""
from __future__ import annotations

import math
from typing import Mapping, Tuple, Union

import torch

LEVELS = ("token", "seq_sum", "seq_mean", "seq_max")
ESTIMATORS = ("k1", "k2", "k3")
CRITERIA = tuple(f"{level}_{est}" for level in LEVELS for est in ESTIMATORS)
"""Every valid criterion name."""

Bound = Union[float, Tuple[float, float]]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def resolve_bounds(criterion: str, bound: Bound, field: str = "rejection") -> Tuple[float, float]:
    """``(lower, upper)`` of one criterion; raises ValueError naming ``field``, the value and what is
    valid. k2/k3 criteria get lower = 0 (their estimators are never negative)."""
    where = f"{field}[{criterion!r}]"
    if criterion not in CRITERIA:
        raise ValueError(f"{field} has the criterion {criterion!r} (bound {bound!r}); valid criteria: "
                         f"{', '.join(CRITERIA)}")
    if criterion.endswith("k1"):
        if _number(bound):
            if not bound >= 1:
                raise ValueError(f"{where}={bound!r} is invalid; valid: a ratio bound U >= 1 (the band [1/U, U]) "
                                 "or a pair (L, U) with 0 <= L <= U")
            return 1.0 / bound, float(bound)
        if (isinstance(bound, (tuple, list)) and len(bound) == 2 and all(_number(b) for b in bound)
                and 0 <= bound[0] <= bound[1] and bound[1] > 0):
            return float(bound[0]), float(bound[1])
        raise ValueError(f"{where}={bound!r} is invalid; valid: a ratio bound U >= 1 (the band [1/U, U]) or a "
                         "pair (L, U) with 0 <= L <= U, U > 0")
    if _number(bound) and bound > 0:
        return 0.0, float(bound)
    raise ValueError(f"{where}={bound!r} is invalid; valid: an upper bound > 0 on the {criterion[-2:]} "
                     "divergence (one number: it is never negative)")


def _divergence(estimator: str, log_rho: torch.Tensor) -> torch.Tensor:
    if estimator == "k1":
        return log_rho  # k1 criteria bound the ratio, i.e. log ρ itself
    if estimator == "k2":
        return 0.5 * log_rho.square()
    return torch.expm1(log_rho) - log_rho


def _inside(x: torch.Tensor, lower: float, upper: float, log_scale: bool) -> torch.Tensor:
    if log_scale:  # a ratio band, compared in log space so that no ratio overflows
        lo = math.log(lower) if lower > 0 else -math.inf
        hi = math.log(upper) if math.isfinite(upper) else math.inf
        return (x >= lo) & (x <= hi)
    return x <= upper


def keep_mask(log_rho: torch.Tensor, mask: torch.Tensor, rejection: Mapping[str, Bound]) -> torch.Tensor:
    """Bool ``[B, T]``: True where every criterion of ``rejection`` keeps the token (padding: False).

    ``log_rho`` ``[B, T]`` detached, 0 at padding; ``mask`` bool ``[B, T]``. A row without tokens has
    nothing to reject."""
    keep = mask.clone()
    maskf = mask.to(log_rho.dtype)
    count = maskf.sum(-1, keepdim=True).clamp(min=1)
    for criterion, bound in rejection.items():
        lower, upper = resolve_bounds(criterion, bound)
        level, estimator = criterion.rsplit("_", 1)
        k = _divergence(estimator, log_rho).masked_fill(~mask, 0.0)
        ratio_band = estimator == "k1"
        if level == "token":
            keep &= _inside(k, lower, upper, ratio_band)
        elif level == "seq_sum":
            keep &= _inside(k.sum(-1, keepdim=True), lower, upper, ratio_band)
        elif level == "seq_mean":
            keep &= _inside(k.sum(-1, keepdim=True) / count, lower, upper, ratio_band)
        else:  # seq_max: the sequence's most extreme token (both ends of the band for k1)
            inside = _inside(k, lower, upper, ratio_band) | ~mask
            keep &= inside.all(-1, keepdim=True)
    return keep
