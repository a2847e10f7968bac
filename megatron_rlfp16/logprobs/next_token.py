"""Next-token log-probs in the trainer's layout: ``[B, S-1]``, aligned with ``input_ids[:, 1:]``.

A causal LM's logits at position s score token s+1. Every per-token tensor of the trainer (loss
mask, rollout / old / reference log-probs, entropy) is ``[B, S-1]`` with entry ``[b, t]`` about the
target ``input_ids[b, t+1]``: log p(input_ids[b, t+1] | input_ids[b, :t+1]). This is the layout of
``megatron_rlfp16.rollout.RolloutBatch.to_tensors``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from megatron_rlfp16.logprobs.vocab_parallel import vocab_parallel_logprobs


def next_token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    tp_group=None,
    vocab_start_index: Optional[int] = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``[B, S-1]`` FP32 log-probs of ``input_ids[:, 1:]`` from ``[B, S, V_local]`` logits; with
    ``with_entropy`` also the ``[B, S-1]`` entropy of the distribution that predicted each target.
    Other arguments as in ``vocab_parallel_logprobs``."""
    if input_ids.dim() != 2 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} must be [B, S, V] "
            "and [B, S]"
        )
    # Every position is scored (the last one against a dummy target, then dropped): slicing the
    # logits to S-1 positions instead would copy them.
    targets = F.pad(input_ids[:, 1:], (0, 1))
    out = vocab_parallel_logprobs(
        logits, targets, vocab_size=vocab_size, tp_group=tp_group, vocab_start_index=vocab_start_index,
        temperature=temperature, with_entropy=with_entropy, chunk_size=chunk_size,
    )
    if with_entropy:
        return out[0][:, :-1], out[1][:, :-1]
    return out[:, :-1]
