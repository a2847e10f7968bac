"""Next-token log-probs laid out like ``input_ids``: the convention every per-token tensor follows.

A causal LM's logits at position s score token s+1. The trainer's per-token tensors (loss mask,
rollout / old / reference log-probs, entropy) are ``[B, S]`` and aligned with ``input_ids``: entry
``[b, s]`` is about token ``input_ids[b, s]``, i.e. log p(input_ids[b, s] | input_ids[b, :s]). Column
0 has no prediction and holds 0 (it must be masked out). A response's mask is then simply "where the
response tokens sit in ``input_ids``", and the rollout engine's log-probs go in the same places.
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
    """``[B, S]`` FP32 log-probs of ``input_ids`` from ``[B, S, V_local]`` logits, aligned with
    ``input_ids`` (column 0 is 0); with ``with_entropy`` also the ``[B, S]`` entropy of the
    distribution that predicted each token. Other arguments as in ``vocab_parallel_logprobs``."""
    if input_ids.dim() != 2 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} must be [B, S, V] "
            "and [B, S]"
        )
    # Every position is scored (the last one against a dummy target and then dropped): slicing the
    # logits to S-1 positions instead would copy them.
    targets = F.pad(input_ids[:, 1:], (0, 1))
    out = vocab_parallel_logprobs(
        logits, targets, vocab_size=vocab_size, tp_group=tp_group, vocab_start_index=vocab_start_index,
        temperature=temperature, with_entropy=with_entropy, chunk_size=chunk_size,
    )
    if with_entropy:
        return tuple(F.pad(t[:, :-1], (1, 0)) for t in out)
    return F.pad(out[:, :-1], (1, 0))
