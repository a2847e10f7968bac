"""Aggregations: per-token losses ``[B, T]`` -> one scalar, divided by GLOBAL denominators.

The denominators (``num_tokens``, ``num_seqs``) are arguments, not something computed from the
micro-batch at hand: gradient accumulation and data parallelism sum the per-call losses, and that
sum equals the full-batch objective only if every call divides by the full batch's count. Dividing
by each micro-batch's own count instead silently reweights tokens by the size of the micro-batch
they happened to land in.
"""
from __future__ import annotations

import torch

from megatron_rlfp16.losses.registry import register_aggregation


@register_aggregation("token-mean")
def token_mean(token_loss, mask, num_tokens, num_seqs, config) -> torch.Tensor:
    """L = Σ_{b,t} m·ℓ / num_tokens: every token weighs the same, whatever its sequence's length.

    DAPO's token-level loss, https://arxiv.org/abs/2503.14476. ``token_loss``, ``mask``: ``[B, T]``.
    """
    return token_loss.sum() / num_tokens


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(token_loss, mask, num_tokens, num_seqs, config) -> torch.Tensor:
    """L = Σ_b Σ_t m·ℓ / num_seqs: sum over a sequence, mean over sequences. ``[B, T]`` in."""
    return token_loss.sum() / num_seqs


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(token_loss, mask, num_tokens, num_seqs, config) -> torch.Tensor:
    """L = Σ_b (Σ_t m·ℓ / Σ_t m) / num_seqs; a fully padded row contributes 0.

    GRPO's original 1/|o_i| per-sequence normalization, https://arxiv.org/abs/2402.03300 (Dr.GRPO,
    https://arxiv.org/abs/2503.20783, shows it biases toward long wrong answers). ``[B, T]`` in.
    """
    lengths = mask.sum(-1)
    per_seq = token_loss.sum(-1) / lengths.clamp(min=1)
    return per_seq.sum() / num_seqs


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(token_loss, mask, num_tokens, num_seqs, config) -> torch.Tensor:
    """L = Σ_{b,t} m·ℓ / (num_seqs·L) with a constant L (``config.norm_length``, default T).

    Dr.GRPO's length-unbiased normalizer, https://arxiv.org/abs/2503.20783. ``[B, T]`` in.
    """
    norm_length = config.norm_length if config.norm_length is not None else token_loss.shape[-1]
    return token_loss.sum() / (num_seqs * norm_length)
