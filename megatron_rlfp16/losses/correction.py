"""Rollout corrections: a detached weight w on ℓ_t for the mismatch between trainer and rollout engine.

The rollout engine samples from μ, which differs from the trainer's π (different kernels, BF16
rounding, ...). The correction reweights each token or sequence by ρ = π_prox / μ, where π_prox is the
objective's proximal policy (π_old for ppo_clip / gspo / cispo, sg(πθ) for pg), then truncates
(TIS) or masks (MIS, IcePop) it at a cap C so a few extreme ratios cannot blow up the variance.

The cap C and floor F are ``config.band()``: ``correction_cap`` / ``correction_floor``, or the
correction's defaults where those are None. Every function here receives ``log_rho`` = log π_prox −
log μ (``[B, T]``, detached, padding = 0, float32 or wider) and returns a detached weight
broadcastable to ``[B, T]``.

Sequence ratios multiply up to thousands of tokens, so they are summed in log space and clamped
before ``exp``: the clamp sits above log C (so min / ≤ C decisions are exact for every finite ρ) and
below the dtype's overflow point (so a masked sequence yields 0, not inf·0 = NaN). With C = inf, a ρ
beyond the dtype's range saturates near its max instead of becoming inf.
"""
from __future__ import annotations

import math

import torch

from megatron_rlfp16.losses.registry import CORRECTIONS, register_correction
from megatron_rlfp16.losses.rejection import keep_mask


def _ratio(log_rho: torch.Tensor, cap: float) -> torch.Tensor:
    """exp(log ρ), exact wherever ρ <= e·C, saturating above (still > C, still finite)."""
    log_max = math.log(torch.finfo(log_rho.dtype).max) - 1.0
    hi = min(math.log(cap) + 1.0, log_max) if math.isfinite(cap) else log_max
    return torch.exp(log_rho.clamp(max=hi))


def _truncate(log_rho: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.clamp(_ratio(log_rho, cap), max=cap)


def _mask(log_rho: torch.Tensor, cap: float, floor: float = 0.0) -> torch.Tensor:
    rho = _ratio(log_rho, cap)
    keep = (rho <= cap) & (rho >= floor)
    return torch.where(keep, rho, torch.zeros_like(rho))


def _band_mask(log_rho: torch.Tensor, config) -> torch.Tensor:
    floor, cap = config.band()
    return _mask(log_rho, cap, floor)


def _sequence_log_rho(log_rho: torch.Tensor) -> torch.Tensor:
    return log_rho.sum(-1, keepdim=True)


@register_correction("token_tis")
def token_tis(log_rho, mask, config) -> torch.Tensor:
    """Token-level truncated IS: w_t = min(ρ_t, C), ρ_t = π_prox(y_t)/μ(y_t). Returns ``[B, T]``.

    TIS, Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training",
    https://fengyao.notion.site/off-policy-rl ; GRPO-Token-TIS in https://arxiv.org/abs/2510.26788.
    """
    return _truncate(log_rho, config.band()[1])


@register_correction("token_mis")
def token_mis(log_rho, mask, config) -> torch.Tensor:
    """Token-level masked IS: w_t = ρ_t·1{F ≤ ρ_t ≤ C}, F = ``correction_floor`` (0: one-sided).
    Returns ``[B, T]``.

    Drops the tokens whose mismatch is too large instead of clamping them, so they add no biased
    gradient (one of the corrections compared in https://arxiv.org/abs/2510.26788).
    """
    return _band_mask(log_rho, config)


@register_correction("seq_tis")
def seq_tis(log_rho, mask, config) -> torch.Tensor:
    """Sequence-level truncated IS: w = min(ρ, C), ρ = Π_t π_prox(y_t)/μ(y_t) over masked tokens.

    With C = inf this is the unbiased sequence IS weight (the FP16 paper's PG-Seq-IS); with finite C it
    is PG-Seq-TIS, https://arxiv.org/abs/2510.26788. Returns ``[B, 1]``.
    """
    return _truncate(_sequence_log_rho(log_rho), config.band()[1])


@register_correction("seq_mis")
def seq_mis(log_rho, mask, config) -> torch.Tensor:
    """Sequence-level masked IS: w = ρ·1{ρ ≤ C}, ρ = Π_t π_prox(y_t)/μ(y_t) over masked tokens.

    A whole sequence is dropped when its likelihood ratio exceeds C (PG-Seq-MIS / GRPO-Seq-MIS in
    https://arxiv.org/abs/2510.26788). Returns ``[B, 1]``.
    """
    return _band_mask(_sequence_log_rho(log_rho), config)


def _geometric_log_rho(log_rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum(-1, keepdim=True).clamp(min=1).to(log_rho.dtype)
    return log_rho.sum(-1, keepdim=True) / count


@register_correction("geo_seq_tis")
def geo_seq_tis(log_rho, mask, config) -> torch.Tensor:
    """Geometric-mean sequence TIS: w = min(ρ_geo, C), ρ_geo = exp(Σ_t m_t log ρ_t / Σ_t m_t).

    The per-token average of the sequence's log-ratio: unlike the product it does not grow with the
    length, so one cap suits short and long responses (verl's "geometric" sequence ratio; GSPO's
    length-normalized ratio applied to the rollout correction). Returns ``[B, 1]``.
    """
    return _truncate(_geometric_log_rho(log_rho, mask), config.band()[1])


@register_correction("geo_seq_mis")
def geo_seq_mis(log_rho, mask, config) -> torch.Tensor:
    """Geometric-mean sequence MIS: w = ρ_geo·1{F ≤ ρ_geo ≤ C}, ρ_geo as in ``geo_seq_tis``: a whole
    sequence is dropped when its per-token mismatch leaves the band. Returns ``[B, 1]``.
    """
    return _band_mask(_geometric_log_rho(log_rho, mask), config)


def normalized(weight: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``weight / mean``; an all-zero batch (mean 0) stays 0."""
    return weight / torch.where(mean > 0, mean, torch.ones_like(mean))


def veto(log_rho: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 for a sequence none of whose tokens has ρ_t < ``threshold``, else 0 (``[B, 1]``): one token
    the trainer finds far less likely than the engine did rejects its sequence (verl's
    ``rollout_token_veto_threshold``)."""
    low = (log_rho < math.log(threshold)) & mask
    return (~low.any(-1, keepdim=True)).to(log_rho.dtype)


@register_correction("icepop")
def icepop(log_rho, mask, config) -> torch.Tensor:
    """IcePop: keep a token's weight only inside a band, w_t = ρ_t·1{floor ≤ ρ_t ≤ C}.

    Ring-1T / IcePop, https://arxiv.org/abs/2510.18855 (it discards tokens whose train/inference
    probability ratio leaves [α, β]; ``correction_floor`` = α, ``correction_cap`` = β, by default the
    paper's 0.5 and 5). Returns ``[B, T]``.
    """
    return _band_mask(log_rho, config)


def rollout_weights(log_rho: torch.Tensor, mask: torch.Tensor, config) -> tuple[torch.Tensor, bool]:
    """The detached ``[B, T]`` weight of every token before batch normalization — the correction's
    weight (1 without one) times the veto times the rejection's keep mask — and whether the
    correction's weight is one per sequence. ``log_rho``, ``mask``: ``[B, T]`` as above."""
    weight = torch.ones_like(log_rho)
    seq_level = False
    if config.correction is not None:
        own = CORRECTIONS.get(config.correction)(log_rho, mask, config).detach()
        seq_level = own.dim() == 2 and own.shape[-1] == 1
        weight = weight * own
    if config.correction_veto is not None:
        weight = weight * veto(log_rho, mask, config.correction_veto)
    if config.rejection is not None:
        weight = weight * keep_mask(log_rho, mask, config.rejection).to(weight.dtype)
    return weight, seq_level


def weight_sums(weight: torch.Tensor, mask: torch.Tensor, seq_level: bool) -> torch.Tensor:
    """``[sum, count]`` whose ratio is the batch mean of the weights (``correction_normalize``):
    over the masked tokens, or for sequence weights over the non-empty rows, each row the mean of
    its tokens' weights. Sums of several micro-batches (and ranks) add up to the whole batch's."""
    maskf = mask.to(weight.dtype)
    if not seq_level:
        return torch.stack([(weight * maskf).sum(), maskf.sum()])
    lengths = maskf.sum(-1)
    per_row = (weight * maskf).sum(-1) / lengths.clamp(min=1)
    return torch.stack([per_row.sum(), (lengths > 0).to(weight.dtype).sum()])
