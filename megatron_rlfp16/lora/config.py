"""``LoraConfig``: low-rank adapters on the trainer's linear layers, named as Hugging Face / PEFT name them."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every target module, in HF names (PEFT's ``target_modules``): attention q/k/v/o and the MLP's
gate/up/down projections."""
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
SYNC_MODES = ("adapter", "merged")


@dataclasses.dataclass(kw_only=True)
class LoraConfig:
    """Adapters ``W + (alpha / rank) · B · A`` on the targeted linear layers; everything else frozen."""

    rank: int = 0
    """Adapter rank r; 0: no LoRA (full fine-tuning)."""
    alpha: Optional[float] = None
    """Scale numerator: the update is ``(alpha / rank) · B · A``. None: ``2 · rank``."""
    dropout: float = 0.0
    """Dropout on the adapter's input (PEFT's ``lora_dropout``)."""
    target_modules: Optional[Tuple[str, ...]] = None
    """HF module names to adapt (PEFT's ``target_modules``). None: every linear LoRA supports for the
    model, all of ``LORA_TARGETS`` for a dense model, attention's q/k/v/o for an MoE model (its MLPs
    are experts)."""
    sync: Optional[str] = None
    """How the rollout engine gets the trained weights: "adapter" (only the adapters move) or
    "merged" (``W + scale · B · A`` through the full refit). None: the run plan's choice."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.resolved_alpha / self.rank

    @property
    def resolved_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)

    def targets_for(self, is_moe: bool) -> Tuple[str, ...]:
        """``target_modules`` with None resolved for a dense or an MoE model."""
        if self.target_modules is not None:
            return tuple(self.target_modules)
        return tuple(t for t in LORA_TARGETS if not (is_moe and t in MLP_TARGETS))

    def validate(self, *, family: Optional[str] = None, is_moe: bool = False) -> "LoraConfig":
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"LoraConfig.rank={self.rank!r}; valid: an integer >= 1 (0: no LoRA)")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                           and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoraConfig.alpha={self.alpha!r}; valid: a number > 0, or None (2 x rank)")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoraConfig.dropout={self.dropout!r}; valid: a number in [0, 1)")
        if self.target_modules is None:
            targets = LORA_TARGETS
        elif isinstance(self.target_modules, str):
            raise ValueError(f"LoraConfig.target_modules={self.target_modules!r}; valid: a tuple of "
                             f"{', '.join(LORA_TARGETS)} (or None: all the model supports)")
        else:
            targets = tuple(self.target_modules)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise ValueError(f"LoraConfig.target_modules={list(targets)!r}: unknown {unknown or 'none given'}; "
                             f"valid: {', '.join(LORA_TARGETS)}")
        if is_moe and self.target_modules is not None:
            experts = [t for t in targets if t in MLP_TARGETS]
            if experts:
                attention = ", ".join(t for t in LORA_TARGETS if t not in MLP_TARGETS)
                raise ValueError(f"LoraConfig.target_modules: {', '.join(experts)} are MoE experts in "
                                 f"{family or 'this model'}, and LoRA on experts is not supported; valid for "
                                 f"{family or 'an MoE model'}: {attention}")
        if self.sync not in (None, *SYNC_MODES):
            raise ValueError(f"LoraConfig.sync={self.sync!r}; valid: None, {', '.join(SYNC_MODES)}")
        return self
