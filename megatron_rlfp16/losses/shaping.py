"""Reward shaping on the response length: DAPO's soft overlong punishment.

DAPO (Yu et al. 2025, https://arxiv.org/abs/2503.14476, "Overlong Reward Shaping"): with L_max the
longest response the rollout allows and L_cache a buffer before it, a response of length L gets

    R_length(L) = 0                              if L <= L_max - L_cache
                = ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
                = -1                             if L > L_max

added to its reward, scaled by a penalty factor. Pure torch; the trainer applies it before the
advantages (``RLConfig.overlong_buffer``).
"""
from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, *, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """``factor · R_length`` per response (``lengths``: ``[N]`` token counts); 0 everywhere when
    ``buffer`` is 0. Raises ValueError for a buffer outside [0, max_len] or a negative factor."""
    if not 0 <= buffer <= max_len:
        raise ValueError(f"overlong buffer={buffer!r}; valid: an integer in [0, max_len={max_len}]")
    if not factor >= 0:
        raise ValueError(f"overlong penalty factor={factor!r}; valid: a number >= 0")
    lengths = lengths.to(torch.float64)
    if buffer == 0:
        return torch.zeros_like(lengths)
    start = max_len - buffer
    ramp = (start - lengths) / buffer
    out = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    out = torch.where(lengths > max_len, torch.full_like(lengths, -1.0), out)
    return factor * out
