"""``PolicyLossConfig``: every knob of the policy loss, checked once in ``validate()``.

Names of objectives, corrections, aggregations and KL estimators are checked against the registries
(``registry.py``), so an extension registered there is a valid value here. See docs/losses.md for how
the named recipes (GRPO, DAPO, Dr.GRPO, GSPO, the FP16 paper's PG-Seq-IS/TIS/MIS) map onto it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_rlfp16.losses.registry import AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES


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

    correction_cap: float = 2.0
    """Cap C on the importance weight ρ: truncation (TIS) clamps at C, masking (MIS, IcePop) drops
    tokens or sequences with ρ > C. ``float('inf')`` gives the uncapped importance weight (PG-Seq-IS)."""

    correction_floor: float = 0.0
    """Lower bound F of the masks ("token_mis", "seq_mis", "geo_seq_mis", "icepop"): tokens or
    sequences with ρ below it are dropped too (two-sided). In [0, correction_cap]; 0 is one-sided.
    The truncations (TIS) do not read it."""

    correction_veto: Optional[float] = None
    """Veto threshold τ: a sequence with any token whose ρ_t = π_prox/μ is below τ gets weight 0, on
    top of the correction (verl's ``rollout_token_veto_threshold``). None disables it; in (0, 1).
    Needs ``rollout_logprobs``."""

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
        if not self.correction_cap > 0:
            raise _bad("correction_cap", self.correction_cap, "a number > 0 (float('inf') = uncapped)")
        if not 0 <= self.clip_low < 1:
            raise _bad("clip_low", self.clip_low, "0 <= clip_low < 1 (the lower clip bound is 1 - clip_low)")
        if not (self.clip_high >= 0 and math.isfinite(self.clip_high)):
            raise _bad("clip_high", self.clip_high, "a finite number >= 0")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise _bad("dual_clip", self.dual_clip, "None or a number > 1")
        if self.norm_length is not None and not self.norm_length > 0:
            raise _bad("norm_length", self.norm_length, "None (use T) or a number > 0")
        if not 0 <= self.correction_floor <= self.correction_cap:
            raise _bad(
                "correction_floor", self.correction_floor,
                f"0 <= correction_floor <= correction_cap (= {self.correction_cap!r})",
            )
        if self.correction_veto is not None and not 0 < self.correction_veto < 1:
            raise _bad("correction_veto", self.correction_veto, "None or a number in (0, 1)")
        for field in ("kl_coef", "entropy_coef"):
            if not math.isfinite(getattr(self, field)):
                raise _bad(field, getattr(self, field), "a finite number")
        return self
