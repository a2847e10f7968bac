"""``PolicyLossConfig``: every knob of the policy loss, checked once in ``validate()``.

Names of objectives, corrections, aggregations and KL estimators are checked against the registries
(``registry.py``), so an extension registered there is a valid value here. See docs/losses.md for how
the named recipes (GRPO, DAPO, Dr.GRPO, GSPO, the FP16 paper's PG-Seq-IS/TIS/MIS) map onto it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from megatron_rlfp16.losses.registry import AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES
from megatron_rlfp16.losses.rejection import Bound, resolve_bounds

DEFAULT_BANDS = {"icepop": (0.5, 5.0)}
"""(floor, cap) a correction uses when ``correction_floor`` / ``correction_cap`` are None; every other
correction uses (0, 2). IcePop's band [α, β] = [0.5, 5] is the Ring-1T paper's
(https://arxiv.org/abs/2510.18855)."""
OTHER_BAND = (0.0, 2.0)
REJECTION_MODES = ("zero", "remove")


def _bad(field: str, value, valid: str) -> ValueError:
    return ValueError(f"PolicyLossConfig.{field}={value!r} is invalid; valid: {valid}")


@dataclass(kw_only=True)
class PolicyLossConfig:
    """Which policy objective, rollout correction, aggregation and regularizers make up the loss."""

    loss: str = "ppo_clip"
    """Per-token objective: "ppo_clip", "gspo", "pg", "cispo" or a name added with
    ``register_policy_loss``."""

    clip_low: float = 0.2
    """Lower clip ε_low: ratios are clipped below at 1 − clip_low. In [0, 1)."""

    clip_high: float = 0.2
    """Upper clip ε_high: ratios are clipped above at 1 + clip_high (DAPO's clip-higher uses 0.28).
    Non-negative."""

    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 (ppo_clip only): for A < 0 the per-token loss is capped at −c·A, so a
    huge ratio on a negative-advantage token cannot dominate the update. None disables it."""

    correction: Optional[str] = None
    """Rollout (training–inference mismatch) correction: None, "token_tis", "token_mis", "seq_tis",
    "seq_mis", "geo_seq_tis", "geo_seq_mis", "icepop" or a name added with ``register_correction``. Any value but None needs
    ``rollout_logprobs``."""

    correction_cap: Optional[float] = None
    """Cap C on the importance weight ρ: truncation (TIS) clamps at C, masking (MIS, IcePop) drops
    tokens or sequences with ρ > C. ``float('inf')`` gives the uncapped importance weight (PG-Seq-IS).
    None: the correction's default, 5.0 for "icepop" (IcePop's β) and 2.0 for the others
    (``band()``)."""

    correction_floor: Optional[float] = None
    """Lower bound F of the masks ("token_mis", "seq_mis", "geo_seq_mis", "icepop"): tokens or
    sequences with ρ below it are dropped too (two-sided). In [0, C]; 0 is one-sided. None: 0.5 for
    "icepop" (IcePop's α), 0 for the others. The truncations (TIS) do not read it."""

    correction_veto: Optional[float] = None
    """Veto threshold τ: a sequence with any token whose ρ_t = π_prox/μ is below τ gets weight 0, on
    top of the correction (verl's ``rollout_token_veto_threshold``). None disables it; in (0, 1).
    Needs ``rollout_logprobs``."""

    rejection: Optional[Mapping[str, Bound]] = None
    """Divergence-based rejection (``rejection.py``): ``{criterion: bound}`` with criteria
    ``token_k1`` … ``seq_max_k3`` (k1/k2/k3 per token, or their sum / mean / max per sequence), e.g.
    ``{"seq_mean_k3": 0.005}`` or ``{"token_k1": (0.5, 2.0)}``. Rejected tokens get weight 0 (or leave
    the loss, ``rejection_mode``) on top of the correction. None disables it. Needs
    ``rollout_logprobs``."""

    rejection_mode: str = "zero"
    """What a rejection does to a token — by the masks ("token_mis", "seq_mis", "geo_seq_mis",
    "icepop"), the veto or ``rejection``: "zero" gives it weight 0 and keeps it in the global
    denominators; "remove" takes it out of the mask and the denominators (verl's rejection
    sampling). With "remove" the decision is taken on π_old, which every objective's proximal
    policy equals before the first update, so the denominators are known before the first
    micro-batch: objectives whose proximal policy is sg(πθ) ("pg") then need ``old_logprobs``."""

    correction_normalize: bool = False
    """Batch-normalized importance weights: the weights are divided by their mean over the batch
    (token weights: over its tokens; sequence weights: over its sequences, each the mean of its
    tokens), after truncation and rejection, so they average 1. ``policy_loss`` takes the mean of
    one call unless given ``weight_mean``; the trainer passes the whole step's."""

    agg: str = "token-mean"
    """How per-token losses become one scalar: "token-mean", "seq-mean-token-sum",
    "seq-mean-token-mean" or "seq-mean-token-sum-norm" (or a registered name). Denominators are the
    global ``num_tokens`` / ``num_seqs`` passed to ``policy_loss``."""

    norm_length: Optional[float] = None
    """Constant length L for "seq-mean-token-sum-norm" (Dr.GRPO divides by num_seqs·L). None uses the
    padded length T of the call, which changes between micro-batches unless they are padded alike;
    set it (e.g. to the max response length) for a fixed normalizer."""

    kl_coef: float = 0.0
    """Weight of the per-token KL penalty to the reference policy; 0 disables it. Non-zero needs
    ``ref_logprobs``."""

    kl_estimator: str = "k3"
    """Per-token KL estimator with Δ = log πθ − log π_ref: "k1" (Δ), "k2" (Δ²/2) or "k3"
    (exp(−Δ) − 1 + Δ), from Schulman's "Approximating KL divergence"."""

    entropy_coef: float = 0.0
    """Weight of the entropy bonus: the loss gets −entropy_coef·H per token. Non-zero needs
    ``entropy``."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "PolicyLossConfig":
        """Checks every field; raises ValueError naming the field, its value and what is valid."""
        if self.loss not in POLICY_LOSSES:
            raise _bad("loss", self.loss, f"{POLICY_LOSSES.names()}")
        if self.correction is not None and self.correction not in CORRECTIONS:
            raise _bad("correction", self.correction, f"None or one of {CORRECTIONS.names()}")
        if self.agg not in AGGREGATIONS:
            raise _bad("agg", self.agg, f"{AGGREGATIONS.names()}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise _bad("kl_estimator", self.kl_estimator, f"{KL_ESTIMATORS.names()}")
        # `not x > 0` (rather than `x <= 0`) also rejects NaN.
        if self.correction_cap is not None and not self.correction_cap > 0:
            raise _bad("correction_cap", self.correction_cap, "None or a number > 0 (float('inf') = uncapped)")
        if not 0 <= self.clip_low < 1:
            raise _bad("clip_low", self.clip_low, "0 <= clip_low < 1 (the lower clip bound is 1 - clip_low)")
        if not (self.clip_high >= 0 and math.isfinite(self.clip_high)):
            raise _bad("clip_high", self.clip_high, "a finite number >= 0")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise _bad("dual_clip", self.dual_clip, "None or a number > 1")
        if self.norm_length is not None and not self.norm_length > 0:
            raise _bad("norm_length", self.norm_length, "None (use T) or a number > 0")
        floor, cap = self.band()
        if self.correction_floor is not None and not 0 <= floor <= cap:
            raise _bad("correction_floor", self.correction_floor, f"None or 0 <= correction_floor <= the cap (= {cap!r})")
        if self.correction_floor is None and not floor <= cap:
            raise _bad("correction_cap", self.correction_cap,
                       f"a cap >= the correction's default floor {floor!r}, or set correction_floor")
        if self.rejection is not None:
            if not isinstance(self.rejection, Mapping) or not self.rejection:
                raise _bad("rejection", self.rejection, "None or a non-empty mapping {criterion: bound}")
            for criterion, bound in self.rejection.items():
                resolve_bounds(criterion, bound, field="PolicyLossConfig.rejection")
        if self.rejection_mode not in REJECTION_MODES:
            raise _bad("rejection_mode", self.rejection_mode, f"{REJECTION_MODES}")
        if self.correction_normalize not in (True, False):
            raise _bad("correction_normalize", self.correction_normalize, "True or False")
        if self.correction_veto is not None and not 0 < self.correction_veto < 1:
            raise _bad("correction_veto", self.correction_veto, "None or a number in (0, 1)")
        for field in ("kl_coef", "entropy_coef"):
            if not math.isfinite(getattr(self, field)):
                raise _bad(field, getattr(self, field), "a finite number")
        return self

    def band(self) -> Tuple[float, float]:
        """``(floor, cap)`` the correction uses: the fields, or the correction's defaults where None."""
        floor, cap = DEFAULT_BANDS.get(self.correction, OTHER_BAND)
        return (floor if self.correction_floor is None else self.correction_floor,
                cap if self.correction_cap is None else self.correction_cap)

    @property
    def corrected(self) -> bool:
        """Whether the loss weighs tokens by the rollout: a correction, the veto or ``rejection``."""
        return self.correction is not None or self.correction_veto is not None or self.rejection is not None
